"""The Lua scripts of the ``redis://`` backend: one script per operation.

Every script receives the same eight keys, all of one name and so all with one hash tag
(``lockd:{NAMESPACE:NAME}:...``), which keeps them in one Redis Cluster slot:

==========  =============================================================================
``holds``   hash owner -> ``token|count|expires_ms|granted_ms|limit``
``hexp``    sorted set owner by expires_ms of the holds granted under a limit above 1
            (finds a semaphore's expired holds; a lock's one hold is read directly)
``token``   the name's counter: the last token issued, ``N``, or ``N+`` once ``revoked``
            holds records (a grant then clears the owner's record)
``queue``   list of waiter ids (``owner<TAB>request_id``), FIFO
``waiters`` hash waiter id -> ``attempt|ttl_ms|enqueued_us|deadline_ms``
``req``     prefix of one string key per remembered request id,
            ``req<TAB>op<TAB>owner<TAB>request_id`` -> outcome, expiring after the
            retention; op ``acquire`` (its grant, or ``abandoned``) or ``release``
``revoked`` sorted set by token of the force-released tokens (``t:TOKEN``) and of the
            owners whose latest hold was force-released (``o:OWNER``), the newest
            MAX_REVOKED kept
``limit``   the resource's holder limit if not 1, kept while it has a holder or a waiter
==========  =============================================================================

``granted_ms`` is when the hold was granted (both its held-for time and its
acquired-at time come from it); ``limit`` is the limit it was granted under.

Every script's ARGV[2] is the *retention* (ms), and ARGV[3] the *token rule*: ``clock``
(one Redis: every token is at least Redis's clock in microseconds) or ``missing``
(RedLock, whose nodes must keep agreeing on tokens: only a missing counter starts from
the clock). ARGV[4] is an
offset in ms added to Redis's clock: 0, except in tests that move the scripts' time.

Redis prunes an idle name by itself:
every key of a name has an expiry, at least the retention after the end of the latest
lease or waiter deadline written into it (``put_hold``, ``put_waiter``; a hold of a lock
sets its keys' expiry exactly, a semaphore's only ever lengthens it). So an idle name's
records (last token, revocations, remembered requests) are kept at least the retention
after it went idle, and at most that after its last lease would have ended; then every
key of it is gone. No key is shared by names, which Redis Cluster's one-slot rule
forbids anyway. Pruning never lets a token repeat or go down: a missing counter (a new
or pruned name, or one lost with Redis's data) starts from Redis's clock in
microseconds, and with the ``clock`` rule every token is at least that, so even a
counter restored from older data gives a token above every earlier one of the name (as
long as its grants came slower than one per microsecond and Redis's clock did not step
back).

Release and extend judge a call that matches no live hold of its owner from the name's
own records, first match winning (``find``): the token is another owner's live hold
(``not_yours``); that token was force-released, or, without a token, the owner's latest
hold of the name was (``revoked``); the token is at most the name's last (``lost``);
otherwise ``not_held``.

Time is Redis's own clock (``TIME``, allowed in scripts since Redis 5 with effects
replication, the only mode of Redis 7); no client timestamp is ever used for expiry.
Every script drops expired holds before any decision they could change, then grants
queued waiters in order while slots are free (``settle``), and finally wakes the
waiters it granted or removed. A waiter whose deadline has passed (it stopped checking
in) is dropped when it reaches the head of the queue, or when it comes back. A waiter's
attempt id is ``INBOX.ID``: the wake-up goes to the channel ARGV[1] .. INBOX, which only
the waiter's own client subscribes to, as ``ATTEMPT=token,count,ttl_left_ms,waited_us``
for a grant (the waiter needs no further round trip) or ``ATTEMPT`` alone for a waiter
that was removed or replaced; several items of one message are separated by spaces. An
attempt id starting with ``!`` belongs to a waiter blocked in BLPOP in its own thread:
its item is pushed to the list ``req<TAB>wake<TAB>ATTEMPT`` instead (expiring after
WAKE_KEEP_MS, in case nobody pops).

Each script is a header comment (its KEYS and ARGV), then the shared ``PRELUDE``, then
(ACQUIRE and RELEASE) its common case, then the shared ``HELPERS``, then its body.
Replies are arrays whose first element is a status word.

Each ``redis.call`` costs a script about 3 microseconds, and so does each handful of
functions a script defines; under contention the scripts' Redis time is on the path
from one holder to the next. So the common calls (an uncontended acquire or release)
return before ``HELPERS`` defines the queue's machinery, a script reads each hold at
most once (``seen``), and calls whose answer is known are skipped, thanks to these
invariants, which every script keeps:

* a script leaves the queue *settled*: no free slot while a live waiter could take it.
  Only time unsettles it, when a hold expires, and ``expire()`` notices that. (A dead
  waiter blocks nobody: it is dropped when it reaches the head.) So a name without holds
  has no queue either, and a name with a free slot has none;
* the limit is fixed while a name has holders or waiters (a request with another limit
  is refused), and each hold records it. So a hold of limit 1 is its name's only hold,
  found without ``hexp``, and dropping it leaves no ``limit`` key to delete.
"""

from __future__ import annotations

__all__ = [
    "ABANDON",
    "ACQUIRE",
    "EXTEND",
    "FORCE_RELEASE",
    "INSPECT",
    "KEY_SUFFIXES",
    "RAISE",
    "RELEASE",
]

KEY_SUFFIXES = (
    "holds",
    "hexp",
    "token",
    "queue",
    "waiters",
    "req",
    "revoked",
    "limit",
)
"""The keys of one name, in the order every script receives them."""

_KEYS_DOC = """\
-- KEYS[1] holds    hash owner -> token|count|expires_ms|granted_ms|limit (granted under)
-- KEYS[2] hexp     zset owner by expires_ms, of the holds granted under a limit above 1
-- KEYS[3] token    counter of the name: "N", or "N+" once KEYS[7] holds records
-- KEYS[4] queue    list of waiter ids "owner\\trequest_id", FIFO
-- KEYS[5] waiters  hash waiter id -> attempt|ttl_ms|enqueued_us|deadline_ms
-- KEYS[6] req      prefix of "req\\top\\towner\\trequest_id" keys -> outcome (expiring);
--                  op acquire (grant, or 'abandoned') or release (count left)
-- KEYS[7] revoked  zset by token of force-released tokens "t:N" and owners "o:OWNER"
-- KEYS[8] limit    holder limit of the resource while it holds or queues, if not 1
"""

PRELUDE = r"""
local K_HOLDS, K_HEXP, K_TOKEN, K_QUEUE = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_REQ, K_REVOKED, K_LIMIT = KEYS[6], KEYS[7], KEYS[8]
-- Numbers given to redis.call are text first: string.format('%d') makes it much faster
-- than Redis's own conversion (%.17g), so the common calls pass text. (Lua's own `..`
-- writes a token as 1.7e+15: tokens are always formatted with %d.)
local RETAIN_MS = tonumber(ARGV[2])  -- how long an idle name's records are kept
local REQ_KEEP_MS = ARGV[2]
local CLOCK_FLOOR = ARGV[3] == 'clock'  -- every token is at least now_us (see next_token)
local WAKE_KEEP_MS = '60000'
local ABANDONED = 'abandoned'  -- an acquire request's outcome once abandoned
local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2]) + tonumber(ARGV[4]) * 1000
local now = math.floor(now_us / 1000)
-- Number of holds as last counted (nil: not counted yet).
local n_holds = nil
-- Holds this script has read or written, by owner; `all_read`: every hold is in it.
local seen, all_read = {}, false
-- The name's limit once known (a hold records it; no limit key means 1).
local limit_now = nil
-- Set when something was removed whose name may keep a limit key: an idle name then
-- deletes it. (Dropping a hold of limit 1 does not: that name has no limit key.)
local drop_limit = false

-- Whether the name has revocation records (the counter says so): nil until read.
local records = nil

-- The name's counter: its last token (nil: none, the name is new or was pruned or lost)
-- and whether K_REVOKED holds records ("N" or "N+").
local function read_counter()
  local v = redis.call('GET', K_TOKEN)
  if not v then
    records = false
    return nil
  end
  local n, mark = string.match(v, '^(%d+)(%+?)$')
  records = mark == '+'
  return tonumber(n)
end

-- Make `key` live at least until `at` (ms, Redis's clock) plus the retention; a key that
-- has no expiry yet gets one. (A missing key stays missing.)
local function keep_until(key, at)
  local ms = string.format('%d', at + RETAIN_MS)
  if redis.call('PEXPIREAT', key, ms, 'GT') == 0 and redis.call('PTTL', key) == -1 then
    redis.call('PEXPIREAT', key, ms)
  end
end

local function parse_hold(owner, v)
  local tok, cnt, exp, gr, lim = string.match(v, '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$')
  local h = {owner = owner, token = tonumber(tok), count = tonumber(cnt),
             expires = tonumber(exp), granted = tonumber(gr), limit = tonumber(lim)}
  limit_now = h.limit
  seen[owner] = h
  return h
end

-- The owner's hold (nil if none).
local function get_hold(owner)
  local h = seen[owner]
  if h or all_read then return h end
  local v = redis.call('HGET', K_HOLDS, owner)
  if not v then return nil end
  return parse_hold(owner, v)
end

-- Write a hold, and make every record of the name live until the retention after its
-- expiry (`counted`: new_hold has set the counter's expiry already).
local function put_hold(h, counted)
  redis.call('HSET', K_HOLDS, h.owner,
    string.format('%d|%d|%d|%d|%d', h.token, h.count, h.expires, h.granted, h.limit))
  seen[h.owner] = h
  if h.limit == 1 then  -- the name's only hold: it alone decides
    local at = string.format('%d', h.expires + RETAIN_MS)
    redis.call('PEXPIREAT', K_HOLDS, at)
    if not counted then redis.call('PEXPIREAT', K_TOKEN, at) end
  else
    redis.call('ZADD', K_HEXP, string.format('%d', h.expires), h.owner)
    for _, key in ipairs({K_HOLDS, K_HEXP, K_TOKEN, K_LIMIT}) do keep_until(key, h.expires) end
  end
  if records ~= false then  -- made with an expiry (FORCE_RELEASE), so GT alone does
    redis.call('PEXPIREAT', K_REVOKED, string.format('%d', h.expires + RETAIN_MS), 'GT')
  end
end

local function del_hold(h)
  redis.call('HDEL', K_HOLDS, h.owner)
  seen[h.owner] = nil
  if h.limit == 1 then  -- the name's only hold
    n_holds, all_read = 0, true
  else
    redis.call('ZREM', K_HEXP, h.owner)
    if n_holds then n_holds = n_holds - 1 end
    drop_limit = true
  end
end

-- The next token of the name: above its last, and from Redis's clock in microseconds
-- when the counter is missing (a new name, one pruned after the retention, or lost with
-- Redis's data). With CLOCK_FLOOR every token is at least that clock, so a counter
-- restored from older data still gives a higher token too. Either holds while the
-- name's grants come slower than one a microsecond.
local function next_token(owner, expires)
  local last = read_counter()
  local token = now_us
  if last then
    token = last + 1
    if CLOCK_FLOOR and token < now_us then token = now_us end
    if records then redis.call('ZREM', K_REVOKED, 'o:' .. owner) end  -- granted again
  else
    redis.call('DEL', K_REVOKED)  -- a name without a counter has no records
  end
  local v = string.format(records and '%d+' or '%d', token)
  if expires then
    redis.call('SET', K_TOKEN, v, 'PXAT', string.format('%d', expires + RETAIN_MS))
  else
    redis.call('SET', K_TOKEN, v, 'KEEPTTL')
  end
  return token
end

local function new_hold(owner, ttl, limit)
  local h = {owner = owner, count = 1, expires = now + ttl, granted = now, limit = limit}
  h.token = next_token(owner, limit == 1 and h.expires)
  put_hold(h, limit == 1)
  if n_holds then n_holds = n_holds + 1 end
  return h
end

local function drop_one(h)
  h.count = h.count - 1
  if h.count == 0 then del_hold(h) else put_hold(h) end
  return h.count
end

-- Remembered request ids: one expiring key each, under the name's hash tag. A request
-- without an id ('') is not remembered: its key is nil (read as `key and GET key`).
local function req_key(op, owner, rid)
  if rid == '' then return nil end
  return K_REQ .. '\t' .. op .. '\t' .. owner .. '\t' .. rid
end

local function remember(key, value)
  if key then redis.call('SET', key, value, 'PX', REQ_KEEP_MS) end
end
"""

HELPERS = r"""
-- Past the common case: queues, expiry, wake-ups and refusals.
local K_WAITERS = KEYS[5]
local woken = {}
local granted = {}  -- waiter id -> grant this script remembered for it
local expired = false  -- expire() has run

-- Every hold, oldest grant first (read at most once).
local function all_holds()
  if not all_read then
    local all = redis.call('HGETALL', K_HOLDS)
    for i = 1, #all, 2 do
      if not seen[all[i]] then parse_hold(all[i], all[i + 1]) end
    end
    all_read = true
  end
  local list = {}
  for _, h in pairs(seen) do table.insert(list, h) end
  table.sort(list, function(a, b) return a.token < b.token end)
  n_holds = #list
  return list
end

local function get_waiter(id)
  local v = redis.call('HGET', K_WAITERS, id)
  if not v then return nil end
  local att, ttl, enq, dl = string.match(v, '^([^|]*)|(%d+)|(%d+)|(%d+)$')
  local owner, rid = string.match(id, '^([^\t]*)\t(.*)$')
  return {id = id, owner = owner, rid = rid, attempt = att, ttl = tonumber(ttl),
          enqueued = tonumber(enq), deadline = tonumber(dl)}
end

local function waiter_value(w)
  return string.format('%s|%d|%d|%d', w.attempt, w.ttl, w.enqueued, w.deadline)
end

-- Write a waiter (`written`: it is already); the queue lives until the retention after
-- its deadline (every waiter's lease is the same, so the newest deadline is the latest).
local function put_waiter(w, written)
  if not written then redis.call('HSET', K_WAITERS, w.id, waiter_value(w)) end
  local at = string.format('%d', w.deadline + RETAIN_MS)
  redis.call('PEXPIREAT', K_WAITERS, at)
  redis.call('PEXPIREAT', K_QUEUE, at)
end

local function del_waiter(id)
  redis.call('LREM', K_QUEUE, 1, id)
  redis.call('HDEL', K_WAITERS, id)
  drop_limit = true
end

-- "token" or "token|waited_us|attempt" (a grant handed to a queued waiter); no token
-- for ABANDONED
local function parse_grant(v)
  local tok, waited, att = string.match(v, '^(%d+)|(%d+)|(.*)$')
  if tok then return tonumber(tok), tonumber(waited), att end
  return tonumber(v), 0, nil
end

local function reenter(h, ttl)
  h.count = h.count + 1
  if now + ttl > h.expires then h.expires = now + ttl end  -- never shortens the hold
  put_hold(h)
end

local function current_limit()
  if not limit_now then limit_now = tonumber(redis.call('GET', K_LIMIT) or '1') or 1 end
  return limit_now
end

-- Drop holds whose expiry has come (Redis's clock); true if there were any.
local function expire()
  expired = true
  n_holds = n_holds or redis.call('HLEN', K_HOLDS)
  local gone = {}
  if n_holds == 1 then  -- a lock's hold (or a semaphore's only one): read it
    for _, h in ipairs(all_holds()) do
      if h.expires <= now then table.insert(gone, h) end
    end
  elseif n_holds > 1 then  -- a semaphore's: every one is in hexp
    for _, owner in ipairs(redis.call('ZRANGEBYSCORE', K_HEXP, '-inf',
                                      string.format('%d', now))) do
      table.insert(gone, get_hold(owner))
    end
  end
  for _, h in ipairs(gone) do del_hold(h) end
  return #gone > 0
end

-- Grant queued waiters in order while slots are free (a full name can still grant the
-- head to an owner that holds already: a re-entry), dropping dead ones on the way.
-- `head`: the queue's first waiter id, already popped (nil: none popped). Returns
-- whether the queue is empty now.
local function grant_waiters(head)
  local id, popped = head, head ~= nil
  if not id then id = redis.call('LINDEX', K_QUEUE, 0) end
  if not id then return true end
  if not expired then expire() end  -- expired holds free their slots first; it counts them
  local limit = current_limit()
  while id do
    local h = nil
    if n_holds > 0 then h = get_hold(string.match(id, '^([^\t]*)')) end
    if not h and n_holds >= limit then
      if popped then redis.call('LPUSH', K_QUEUE, id) end  -- not its turn after all
      return false
    end
    if not popped then redis.call('LPOP', K_QUEUE) end
    local w = get_waiter(id)
    if w then redis.call('HDEL', K_WAITERS, id) end
    drop_limit = true
    if w and w.deadline > now then
      if h then reenter(h, w.ttl) else h = new_hold(w.owner, w.ttl, limit) end
      local key = req_key('acquire', w.owner, w.rid)
      if key then
        local grant = string.format('%d|%d|%s', h.token, now_us - w.enqueued, w.attempt)
        remember(key, grant)
        granted[id] = grant
      end
      table.insert(woken, string.format('%s=%d,%d,%d,%d', w.attempt, h.token, h.count,
        h.expires - now, now_us - w.enqueued))
    end
    if n_holds < limit then
      id, popped = redis.call('LPOP', K_QUEUE), true
    else
      id, popped = redis.call('LINDEX', K_QUEUE, 0), false
    end
  end
  return true
end

-- Grant queued waiters in order while slots are free (`head`: see grant_waiters);
-- forget an idle resource's limit.
local function settle(head)
  local empty = grant_waiters(head)
  if drop_limit and empty then
    n_holds = n_holds or redis.call('HLEN', K_HOLDS)
    if n_holds == 0 then
      redis.call('DEL', K_LIMIT)
      limit_now = 1
    end
  end
end

-- Drop expired holds, and settle if any were (the queue was settled before; see the
-- invariants), or always with `always`. A name without holds has no queue either.
local function touch(always)
  n_holds = n_holds or redis.call('HLEN', K_HOLDS)
  if n_holds == 0 then return end
  if expire() or always then settle() end
end

-- Wake the waiters this script granted or removed (each client on its own inbox
-- channel, or a waiter blocked on its own list), then return the reply.
local function finish(reply)
  if #woken == 0 then return reply end
  local inboxes, order = {}, {}
  for _, item in ipairs(woken) do
    if string.byte(item, 1) == 33 then  -- '!': the waiter pops its own list
      local list = K_REQ .. '\twake\t' .. string.match(item, '^[^=]*')
      redis.call('RPUSH', list, item)
      redis.call('PEXPIRE', list, WAKE_KEEP_MS)
    else
      local inbox = string.match(item, '^([^.=]*)%.') or ''
      if not inboxes[inbox] then
        inboxes[inbox] = {}
        table.insert(order, inbox)
      end
      table.insert(inboxes[inbox], item)
    end
  end
  for _, inbox in ipairs(order) do
    redis.call('PUBLISH', ARGV[1] .. inbox, table.concat(inboxes[inbox], ' '))
  end
  return reply
end

-- Find the owner's live hold (matching token when one is given), or say why not, from
-- this name's records only, first match winning: 'not_yours' (the token is another
-- owner's live hold), 'revoked' (that token was force-released; without a token: this
-- owner's latest hold here was), 'lost' (the token is one this name issued), else
-- 'not_held'. Expired holds must be dropped first.
local function find(owner, token)
  local h = get_hold(owner)
  if h and (token == 0 or h.token == token) then return h, nil end
  if token == 0 then
    if redis.call('ZSCORE', K_REVOKED, 'o:' .. owner) then return nil, 'revoked' end
    return nil, 'not_held'
  end
  for _, other in ipairs(all_holds()) do
    if other.token == token then return nil, 'not_yours' end
  end
  if redis.call('ZSCORE', K_REVOKED, string.format('t:%d', token)) then
    return nil, 'revoked'
  end
  if token <= (read_counter() or 0) then return nil, 'lost' end
  return nil, 'not_held'
end

local function grant_reply(h, waited_us)
  return {'granted', h.token, h.count, h.expires - now, waited_us, h.limit}
end
"""


def _script(header: str, body: str, common_case: str = "") -> str:
    """A script: its header, the keys, PRELUDE, its common case, HELPERS, its body.

    Each function a script defines costs every call that reaches the definition, so
    the common case (an uncontended acquire or release) comes before HELPERS and
    returns without making them. The body handles every other case, going on from what
    the common case has read or done.
    """
    return header + _KEYS_DOC + PRELUDE + common_case + HELPERS + body


ACQUIRE = _script(
    """\
-- lockd acquire: grant at once, queue, check in while queued, or leave the queue.
-- ARGV[1..4] wake-up channel prefix, retention ms, token rule, clock offset ms
-- ARGV[5] owner     ARGV[6] request id
-- ARGV[7] attempt id (unique per call)             ARGV[8] ttl_ms
-- ARGV[9] limit                  ARGV[10] mode: try | new | wait | leave
-- ARGV[11] waiter lease ms: a queued waiter that does not check in within it drops out
-- Replies: {'granted', token, count, ttl_left_ms, waited_us, limit}
--   | {'queued', next_expiry_ms, {holder owners}} | {'denied', holders} | {'abandoned'}
--   | {'replaced'} | {'gone', holders} | {'lost', token}
--   | {'invalid', current_limit}
""",
    common_case=r"""
local owner, rid, ttl, limit = ARGV[5], ARGV[6], tonumber(ARGV[8]), tonumber(ARGV[9])
local key = req_key('acquire', owner, rid)
local rem = key and redis.call('GET', key)
if rem == ABANDONED then return {'abandoned'} end
n_holds = redis.call('HLEN', K_HOLDS)
if n_holds == 0 and not rem and ARGV[10] ~= 'leave' then
  -- Nobody holds, so nobody waits, nothing expires and there is no limit key (see the
  -- invariants): a new request is granted at once.
  if limit ~= 1 then redis.call('SET', K_LIMIT, limit) end
  local h = new_hold(owner, ttl, limit)
  remember(key, string.format('%d', h.token))
  return {'granted', h.token, 1, ttl, 0, limit}
end
""",
    body=r"""
local attempt, mode, lease = ARGV[7], ARGV[10], tonumber(ARGV[11])
local waiting = (mode == 'wait' or mode == 'leave')

-- ms until the earliest holder expiry (-1: none) and the holders, for a queued reply
local function queued()
  local owners, first = {}, nil
  for _, h in ipairs(all_holds()) do
    table.insert(owners, h.owner)
    if not first or h.expires < first then first = h.expires end
  end
  return finish({'queued', first and math.max(0, first - now) or -1, owners})
end

-- "owner (token N), ..." of the live holds, for a timeout's message
local function holders_text()
  local parts = {}
  for _, h in ipairs(all_holds()) do
    table.insert(parts, string.format('%s (token %d)', h.owner, h.token))
  end
  if #parts == 0 then return 'nobody' end
  return table.concat(parts, ', ')
end

-- This request's queue entry, if it is still alive (a dead one is dropped here).
local function own_waiter(id)
  local w = get_waiter(id)
  if w and w.deadline <= now then
    del_waiter(id)
    settle()  -- it may have been the head
    return nil
  end
  return w
end

-- A retry of a queued request takes over its place.
local function take_over(w)
  table.insert(woken, w.attempt)
  w.attempt = attempt
  w.deadline = now + lease
  put_waiter(w)
  return queued()
end

touch(waiting)  -- a check-in settles: a dead waiter at the head goes
local id = owner .. '\t' .. rid
rem = granted[id] or rem  -- touch() may have granted this very request from the queue
if rem then
  local tok, waited, att = parse_grant(rem)
  if waiting and att ~= nil and att ~= attempt then return finish({'replaced'}) end
  local h = get_hold(owner)
  if not h or h.token ~= tok then return finish({'lost', tok}) end
  if not waiting then waited = 0 end
  return finish(grant_reply(h, waited))
end
if waiting then
  local w = own_waiter(id)
  if w and w.attempt == attempt then
    if mode == 'leave' then
      del_waiter(id)
      settle()
      return finish({'gone', holders_text()})
    end
    w.deadline = now + lease
    put_waiter(w)
    return queued()
  end
  if w then return finish({'replaced'}) end
  if mode == 'leave' then return finish({'gone', holders_text()}) end
  -- dropped from the queue (it missed its deadline): it queues again below
end
if n_holds > 0 then  -- so the name has a limit (and a free slot means no queue)
  local have = current_limit()
  if have ~= limit then return finish({'invalid', have}) end
elseif limit ~= 1 then
  redis.call('SET', K_LIMIT, limit)
end
local h = nil
if n_holds > 0 then h = get_hold(owner) end
if h then
  if mode == 'new' then
    local w = own_waiter(id)
    if w then return take_over(w) end
  end
  reenter(h, ttl)
  remember(key, string.format('%d', h.token))
  return finish(grant_reply(h, 0))
end
if n_holds < limit then  -- a free slot: settled, so nobody waits
  h = new_hold(owner, ttl, limit)
  remember(key, string.format('%d', h.token))
  return finish(grant_reply(h, 0))
end
if mode == 'try' then return finish({'denied', holders_text()}) end
local w = {id = id, attempt = attempt, ttl = ttl, enqueued = now_us, deadline = now + lease}
local written = redis.call('HSETNX', K_WAITERS, id, waiter_value(w)) == 1
if not written then
  local queued_before = own_waiter(id)
  if queued_before then return take_over(queued_before) end
end
redis.call('RPUSH', K_QUEUE, id)
put_waiter(w, written)
return queued()
""",
)

RELEASE = _script(
    """\
-- lockd release: drop one count of the owner's hold, then grant waiters in order.
-- ARGV[1..4] wake-up channel prefix, retention ms, token rule, clock offset ms
-- ARGV[5] owner   ARGV[6] token (0: any)
-- ARGV[7] request id ('' none)
-- Replies: {'ok', count_left} | {'not_yours'} | {'revoked'} | {'lost'} | {'not_held'}
""",
    common_case=r"""
local owner, token = ARGV[5], tonumber(ARGV[6])
local key = req_key('release', owner, ARGV[7])
local rem = key and redis.call('GET', key)
if rem then return {'ok', tonumber(rem)} end
-- The common case: the owner's own live hold (with its token, if one is given). Other
-- holds that expired matter only to waiters, and settle() drops them before granting
-- any, so this case need not look for them.
local h = get_hold(owner)
local own = h and h.expires > now and (token == 0 or h.token == token)
local left, head = 0, nil
if own then
  left = drop_one(h)
  remember(key, string.format('%d', left))
  if left > 0 then return {'ok', left} end  -- no slot freed
  if h.limit == 1 then  -- the lock is free now: its first waiter, if any, takes it
    head = redis.call('LPOP', K_QUEUE)
    if not head then return {'ok', 0} end
  end
end
""",
    body=r"""
if not own then
  expire()
  local why
  h, why = find(owner, token)
  if not h then
    settle()
    return finish({why})
  end
  left = drop_one(h)
  remember(key, string.format('%d', left))
end
settle(head)
return finish({'ok', left})
""",
)

EXTEND = _script(
    """\
-- lockd extend: make the owner's hold last ttl_ms from now (Redis's clock).
-- ARGV[1..4] wake-up channel prefix, retention ms, token rule, clock offset ms
-- ARGV[5] owner   ARGV[6] token (0: any)   ARGV[7] ttl_ms
-- Replies: {'granted', token, count, ttl_left_ms, 0, limit} | {'not_yours'} | {'revoked'}
--   | {'lost'} | {'not_held'}
""",
    r"""
local owner, token, ttl = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
touch()
local h, why = find(owner, token)
if not h then return finish({why}) end
h.expires = now + ttl
put_hold(h)
return finish(grant_reply(h, 0))
""",
)

ABANDON = _script(
    """\
-- lockd abandon: undo acquire request_id whose caller has gone, whatever it reached:
-- leave the queue, release a grant once, or refuse the request when it arrives.
-- ARGV[1..4] wake-up channel prefix, retention ms, token rule, clock offset ms
-- ARGV[5] owner   ARGV[6] request id
-- Replies: {'ok'}
""",
    r"""
local owner, rid = ARGV[5], ARGV[6]
local key = req_key('acquire', owner, rid)
local rem = key and redis.call('GET', key)
if rem == ABANDONED then return {'ok'} end
touch()
local id = owner .. '\t' .. rid
local w = get_waiter(id)
if w then
  del_waiter(id)
  if w.deadline > now then table.insert(woken, w.attempt) end  -- a dead one is not told
  settle()
else
  rem = granted[id] or rem  -- touch() may have granted it from the queue just now
  if rem then
    local tok = parse_grant(rem)
    local h = get_hold(owner)
    if h and h.token == tok then
      drop_one(h)
      settle()
    end
  end
end
remember(key, ABANDONED)  -- its grant (if any) is released: only the refusal matters now
return finish({'ok'})
""",
)

FORCE_RELEASE = _script(
    """\
-- lockd force_release: evict every holder (or one owner); their tokens are revoked.
-- ARGV[1..4] wake-up channel prefix, retention ms, token rule, clock offset ms
-- ARGV[5] owner ('' : every holder)
-- Replies: {'ok', {owner, token, count, ttl_left_ms, held_for_ms, acquired_at_ms}...}
""",
    r"""
local only = ARGV[5]
local MAX_REVOKED = 1000  -- records (tokens and owners) kept per name, the newest
touch()
local evicted = {}
local horizon = now  -- the latest lease of the name: its records live until then, and more
for _, h in ipairs(all_holds()) do
  horizon = math.max(horizon, h.expires)
  if only == '' or h.owner == only then
    del_hold(h)
    local tok = string.format('%d', h.token)
    redis.call('ZADD', K_REVOKED, tok, 't:' .. tok, tok, 'o:' .. h.owner)
    table.insert(evicted, {h.owner, h.token, h.count, h.expires - now, now - h.granted,
                           h.granted})
  end
end
if #evicted > 0 then
  redis.call('ZREMRANGEBYRANK', K_REVOKED, 0, -(MAX_REVOKED + 1))
  local last = read_counter()
  if last and not records then  -- mark the counter: grants now clear owners' records
    redis.call('SET', K_TOKEN, string.format('%d+', last), 'KEEPTTL')
  end
  keep_until(K_REVOKED, horizon)  -- as long as the name's other records
end
settle()
return finish({'ok', evicted})
""",
)

INSPECT = _script(
    """\
-- lockd inspect: holders, live waiters in order, limit and last token of one name.
-- ARGV[1..4] wake-up channel prefix, retention ms, token rule, clock offset ms
-- Replies: {'ok', limit, last_token, {{owner, token, count, ttl_left_ms, held_for_ms,
--   acquired_at_ms}...}, {{owner, waited_us}...}}
""",
    r"""
touch(true)
local holders = {}
for _, h in ipairs(all_holds()) do
  table.insert(holders, {h.owner, h.token, h.count, h.expires - now, now - h.granted,
                         h.granted})
end
local waiters = {}
for _, id in ipairs(redis.call('LRANGE', K_QUEUE, 0, -1)) do
  local w = get_waiter(id)
  if w and w.deadline > now then table.insert(waiters, {w.owner, now_us - w.enqueued}) end
end
return finish({'ok', current_limit(), read_counter() or 0, holders, waiters})
""",
)

RAISE = _script(
    """\
-- lockd raise (RedLock): give the owner's hold the token a majority of nodes agreed on,
-- and lift the counter to it, so every later grant on this node gets a higher token.
-- ARGV[1..4] wake-up channel prefix, retention ms, token rule, clock offset ms
-- ARGV[5] owner   ARGV[6] token this node granted
-- ARGV[7] agreed token (higher)   ARGV[8] request id of the acquire
-- Replies: {'ok'} | {'not_held'}
""",
    r"""
local owner, old, new = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
touch()
local h = get_hold(owner)
if h and h.token == new then return finish({'ok'}) end
if not h or h.token ~= old then return finish({'not_held'}) end
local last = read_counter()
if (last or 0) < new then
  redis.call('SET', K_TOKEN, string.format(records and '%d+' or '%d', new), 'KEEPTTL')
end
h.token = new
put_hold(h)
local key = req_key('acquire', owner, ARGV[8])
local rem = key and redis.call('GET', key)
if rem then  -- an abandoned request stays abandoned (parse_grant gives no token)
  local tok, waited, att = parse_grant(rem)
  if tok == old and att then
    remember(key, string.format('%d|%d|%s', new, waited, att))
  elseif tok == old then
    remember(key, string.format('%d', new))
  end
end
return finish({'ok'})
""",
)
