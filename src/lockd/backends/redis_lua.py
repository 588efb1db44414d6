"""The Lua scripts of the ``redis://`` backend: one script per operation.

Every script receives the same eight keys, all of one name and so all with one hash tag
(``lockd:{NAMESPACE:NAME}:...``), which keeps them in one Redis Cluster slot:

==========  =============================================================================
``holds``   hash owner -> ``token|count|expires_ms|granted_ms|limit``
``hexp``    sorted set owner by expires_ms of the holds granted under a limit above 1
            (finds a semaphore's expired holds; a lock's one hold is read directly)
``token``   the name's INCR counter: the last token issued; never deleted
``queue``   list of waiter ids (``owner<TAB>request_id``), FIFO
``waiters`` hash waiter id -> ``attempt|ttl_ms|enqueued_us|deadline_ms``
``req``     prefix of one string key per remembered request id,
            ``req<TAB>op<TAB>owner<TAB>request_id`` -> outcome, expiring after REQ_KEEP_MS;
            op ``acquire`` (its grant, or ``abandoned`` once abandoned) or ``release``
``revoked`` sorted set of force-released tokens (the newest MAX_REVOKED kept)
``limit``   the resource's holder limit if not 1, kept while it has a holder or a waiter
==========  =============================================================================

``granted_ms`` is when the hold was granted (both its held-for time and its
acquired-at time come from it); ``limit`` is the limit it was granted under.

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
-- KEYS[3] token    INCR counter of the name (never deleted)
-- KEYS[4] queue    list of waiter ids "owner\\trequest_id", FIFO
-- KEYS[5] waiters  hash waiter id -> attempt|ttl_ms|enqueued_us|deadline_ms
-- KEYS[6] req      prefix of "req\\top\\towner\\trequest_id" keys -> outcome (expiring);
--                  op acquire (grant, or 'abandoned') or release (count left)
-- KEYS[7] revoked  zset of force-released tokens
-- KEYS[8] limit    holder limit of the resource while it holds or queues, if not 1
"""

PRELUDE = r"""
local K_HOLDS, K_HEXP, K_TOKEN, K_QUEUE = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_REQ, K_LIMIT = KEYS[6], KEYS[8]
-- Numbers given to redis.call are text first: string.format('%d') makes it much faster
-- than Redis's own conversion (%.17g), so the common calls pass text.
local REQ_KEEP_MS = '600000'
local WAKE_KEEP_MS = '60000'
local ABANDONED = 'abandoned'  -- an acquire request's outcome once abandoned
local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
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

local function put_hold(h)
  redis.call('HSET', K_HOLDS, h.owner,
    string.format('%d|%d|%d|%d|%d', h.token, h.count, h.expires, h.granted, h.limit))
  if h.limit ~= 1 then redis.call('ZADD', K_HEXP, string.format('%d', h.expires), h.owner) end
  seen[h.owner] = h
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

local function new_hold(owner, ttl, limit)
  local h = {owner = owner, token = redis.call('INCR', K_TOKEN), count = 1,
             expires = now + ttl, granted = now, limit = limit}
  put_hold(h)
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
local K_WAITERS, K_REVOKED = KEYS[5], KEYS[7]
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

-- Find the owner's live hold (matching token when one is given), or say why not.
-- Expired holds must be dropped first.
local function find(owner, token)
  local h = get_hold(owner)
  if h and (token == 0 or h.token == token) then return h, nil end
  if token ~= 0 then
    for _, other in ipairs(all_holds()) do
      if other.token == token then return nil, 'not_held' end
    end
    if redis.call('ZSCORE', K_REVOKED, token) then return nil, 'revoked' end
    if token <= tonumber(redis.call('GET', K_TOKEN) or '0') then return nil, 'lost' end
  end
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
-- ARGV[1] wake-up channel prefix    ARGV[2] owner     ARGV[3] request id
-- ARGV[4] attempt id (unique per call)             ARGV[5] ttl_ms
-- ARGV[6] limit                  ARGV[7] mode: try | new | wait | leave
-- ARGV[8] waiter lease ms: a queued waiter that does not check in within it drops out
-- Replies: {'granted', token, count, ttl_left_ms, waited_us, limit}
--   | {'queued', next_expiry_ms, {holder owners}} | {'denied', holders} | {'abandoned'}
--   | {'replaced'} | {'gone', holders} | {'lost', token}
--   | {'invalid', current_limit}
""",
    common_case=r"""
local owner, rid, ttl, limit = ARGV[2], ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6])
local key = req_key('acquire', owner, rid)
local rem = key and redis.call('GET', key)
if rem == ABANDONED then return {'abandoned'} end
n_holds = redis.call('HLEN', K_HOLDS)
if n_holds == 0 and not rem and ARGV[7] ~= 'leave' then
  -- Nobody holds, so nobody waits, nothing expires and there is no limit key (see the
  -- invariants): a new request is granted at once.
  if limit ~= 1 then redis.call('SET', K_LIMIT, limit) end
  local h = new_hold(owner, ttl, limit)
  remember(key, string.format('%d', h.token))
  return {'granted', h.token, 1, ttl, 0, limit}
end
""",
    body=r"""
local attempt, mode, lease = ARGV[4], ARGV[7], tonumber(ARGV[8])
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
    table.insert(parts, h.owner .. ' (token ' .. h.token .. ')')
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
  redis.call('HSET', K_WAITERS, w.id, waiter_value(w))
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
    redis.call('HSET', K_WAITERS, id, waiter_value(w))
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
if redis.call('HSETNX', K_WAITERS, id, waiter_value(w)) == 0 then
  local queued_before = own_waiter(id)
  if queued_before then return take_over(queued_before) end
  redis.call('HSET', K_WAITERS, id, waiter_value(w))
end
redis.call('RPUSH', K_QUEUE, id)
return queued()
""",
)

RELEASE = _script(
    """\
-- lockd release: drop one count of the owner's hold, then grant waiters in order.
-- ARGV[1] wake-up channel prefix   ARGV[2] owner   ARGV[3] token (0: any)
-- ARGV[4] request id ('' none)
-- Replies: {'ok', count_left} | {'not_held'} | {'lost'} | {'revoked'}
""",
    common_case=r"""
local owner, token = ARGV[2], tonumber(ARGV[3])
local key = req_key('release', owner, ARGV[4])
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
-- ARGV[1] wake-up channel prefix   ARGV[2] owner   ARGV[3] token (0: any)   ARGV[4] ttl_ms
-- Replies: {'granted', token, count, ttl_left_ms, 0, limit} | {'not_held'} | {'lost'}
--   | {'revoked'}
""",
    r"""
local owner, token, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
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
-- ARGV[1] wake-up channel prefix   ARGV[2] owner   ARGV[3] request id
-- Replies: {'ok'}
""",
    r"""
local owner, rid = ARGV[2], ARGV[3]
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
-- ARGV[1] wake-up channel prefix   ARGV[2] owner ('' : every holder)
-- Replies: {'ok', {owner, token, count, ttl_left_ms, held_for_ms, acquired_at_ms}...}
""",
    r"""
local only = ARGV[2]
local MAX_REVOKED = 1000
touch()
local evicted = {}
for _, h in ipairs(all_holds()) do
  if only == '' or h.owner == only then
    del_hold(h)
    redis.call('ZADD', K_REVOKED, h.token, h.token)
    table.insert(evicted, {h.owner, h.token, h.count, h.expires - now, now - h.granted,
                           h.granted})
  end
end
redis.call('ZREMRANGEBYRANK', K_REVOKED, 0, -(MAX_REVOKED + 1))
settle()
return finish({'ok', evicted})
""",
)

INSPECT = _script(
    """\
-- lockd inspect: holders, live waiters in order, limit and last token of one name.
-- ARGV[1] wake-up channel prefix
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
local last = tonumber(redis.call('GET', K_TOKEN) or '0')
return finish({'ok', current_limit(), last, holders, waiters})
""",
)

RAISE = _script(
    """\
-- lockd raise (RedLock): give the owner's hold the token a majority of nodes agreed on,
-- and lift the counter to it, so every later grant on this node gets a higher token.
-- ARGV[1] wake-up channel prefix   ARGV[2] owner   ARGV[3] token this node granted
-- ARGV[4] agreed token (higher)   ARGV[5] request id of the acquire
-- Replies: {'ok'} | {'not_held'}
""",
    r"""
local owner, old, new = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
touch()
local h = get_hold(owner)
if h and h.token == new then return finish({'ok'}) end
if not h or h.token ~= old then return finish({'not_held'}) end
if tonumber(redis.call('GET', K_TOKEN) or '0') < new then redis.call('SET', K_TOKEN, new) end
h.token = new
put_hold(h)
local key = req_key('acquire', owner, ARGV[5])
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
