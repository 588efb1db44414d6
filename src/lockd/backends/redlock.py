"""The ``redlock://host1:port,host2:port,...`` backend: RedLock over N independent Redis nodes.

Every node keeps the layout and runs the Lua scripts of the ``redis://`` backend
(:mod:`lockd.backends.redis_lua`); this module sends them and decides from the replies.
Nodes are independent Redis servers (not replicas of each other, not one cluster).

Acquiring. The request goes to every node in parallel, each call bounded by a timeout far
below the ttl (:func:`node_timeout`). It is granted when a quorum of nodes granted it and
it is still valid: validity = ttl - elapsed - drift, where elapsed is measured on the
monotonic clock from before the request was sent to each granting node (the node's own
clock measures its ttl from a moment after that send) and drift = 0.01 x ttl + 2 ms. The
quorum is a majority (N // 2 + 1) for a lock. For a semaphore of limit k it is
k·N // (k + 1) + 1, the least number with which k + 1 owners can never each hold a quorum
(k = 2 on 3 nodes needs all three): semaphores need more nodes up than locks do. A
grant's ``ttl`` is its validity. A failed attempt is undone on every node (ABANDON, which
checks the owner and request id) and retried after a random delay while the caller's
``wait`` lasts. Extending needs a quorum too, with the same validity rule.

Waiting is FIFO on each node: a blocked request queues on every node, wakes by each
node's pub/sub message (which carries that node's grant), and checks in with the same
bounded re-check as ``redis://``.
Requests sent at nearly the same moment can reach two nodes in different orders; then the
nodes may grant different waiters so that nobody holds a quorum. A waiter that holds some
nodes while no other owner holds a quorum looks again after a short random pause, and if
the split remains it gives its nodes back and queues again after a random delay.

Tokens. Every node has its own counter; a grant's token is the highest one its granting
nodes gave. When they disagree, the lower nodes are raised to it (the RAISE script)
before the grant is reported, so a quorum of nodes has counted to the token. Any later
grant's quorum shares a node with it and so gets a higher token. This holds as long as
a majority of nodes keeps its counters. A node's counter that is missing (a new name, a
name pruned after the retention, a node that restarted empty) starts from the node's
clock in microseconds: above the tokens it issued before as long as grants came slower
than one per microsecond and its clock did not step back. The nodes' clocks differ, so
the first grant of a name (and of a pruned one) always takes the RAISE round trip, and a
sync caller's first grant of it goes on in the I/O loop.

Safety: ``timing-dependent``. Mutual exclusion holds only while process pauses, network
delays and clock rate differences stay within the drift allowance: a holder paused past
its validity, or a node whose clock jumps forward, can leave two owners each believing
they hold. Fencing tokens let a protected resource refuse the older one. A crashed node
must stay down for longer than the longest ttl in use before it rejoins, unless it
persisted every write (``appendfsync always``): otherwise it comes back without the holds
it granted and can grant them again.

Availability: grants go on while a quorum of nodes answers; with fewer, acquire and
extend fail with :class:`~lockd.errors.BackendUnavailable`, and grants resume when the
nodes return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from lockd.backends import redact_url
from lockd.backends.base import (
    AcquireRequest,
    Backend,
    ContinueOnLoop,
    DirectPath,
    undo_on_cancel,
)
from lockd.backends.redis import RETENTION, RedisBackend
from lockd.backends.redis_calls import holder_info, not_held
from lockd.backends.redis_direct import RedisDirect
from lockd.backends.redis_wait import CHECK_IN, WAITER_LEASE
from lockd.errors import (
    AcquireTimeout,
    BackendUnavailable,
    InvalidRequest,
    LockError,
    LockLost,
)
from lockd.model import Capabilities, Grant, HolderInfo, ResourceInfo, SafetyLevel, WaiterInfo

__all__ = ["RedlockBackend", "node_timeout", "quorum"]

log = logging.getLogger("lockd")

T = TypeVar("T")

DRIFT_FACTOR = 0.01
DRIFT_MIN = 0.002
"""Clock drift allowance: DRIFT_FACTOR x ttl + DRIFT_MIN seconds."""
RETRY_DELAY = (0.005, 0.05)
"""Bounds of the random pause, in seconds, before a failed attempt is tried again."""
SPLIT_RECHECK = (0.002, 0.02)
"""Bounds of the random pause before a suspected split is looked at again."""
DELIVERY_GRACE = 0.002
"""Seconds a waiter that got some nodes' grants by message waits for the rest's."""
WAITER_LEASE_MS = round(WAITER_LEASE * 1000)
MAX_REMEMBERED = 4096
"""Request ids whose attempts (rounds) this process remembers, for abandon and retries."""


def quorum(nodes: int, limit: int) -> int:
    """Nodes that must grant a hold: a majority for a lock, more for a semaphore."""
    return nodes * limit // (limit + 1) + 1


def node_timeout(ttl: float) -> float:
    """Seconds one node may take to answer one request: far below the ttl."""
    return min(1.0, max(0.05, ttl / 5))


def _validity(ends: list[float], need: int, ttl: float) -> float:
    """Seconds left of a hold that ``need`` of the nodes ending at ``ends`` (monotonic
    lower bounds) agree on, less the clock-drift allowance; <= 0: not valid."""
    quorum_end = sorted(ends, reverse=True)[need - 1]
    return quorum_end - (DRIFT_FACTOR * ttl + DRIFT_MIN) - time.monotonic()


@dataclass
class _NodeGrant:
    token: int
    count: int
    ends: float
    """Monotonic time by which the node's hold has surely not ended: send time + ttl left."""


@dataclass
class _Round:
    """One attempt of an acquire on every node, under its own request id."""

    base: str
    index: int
    attempt: str
    """Where the nodes' wake-up messages for this round go (``INBOX.ID``)."""
    reused: bool = False
    """A retry of the same request id: the nodes answer it from what they remember."""
    undone: bool = False
    grants: dict[int, _NodeGrant] = field(default_factory=dict)
    holders: dict[int, list[str]] = field(default_factory=dict)  # nodes that queued us
    trouble: dict[int, str] = field(default_factory=dict)  # nodes with another status
    unreachable: set[int] = field(default_factory=set)
    next_expiry: float | None = None
    started: float = 0.0
    """Monotonic time before the round's first request was sent."""
    denied: str = ""
    lost_token: int | None = None

    @property
    def rid(self) -> str:
        """The request id the nodes see: one per round of a caller's request id."""
        return f"{self.base}~{self.index}"


@dataclass
class _Begun:
    """A round whose first step a sync caller's thread sent (``_RedlockDirect``), for
    the I/O loop to go on with."""

    round: _Round
    woken: asyncio.Event


class RedlockBackend(Backend):
    """Locks on N independent Redis nodes by majority (``redlock://h1:p1,h2:p2,h3:p3``)."""

    capabilities = Capabilities(
        safety=SafetyLevel.TIMING_DEPENDENT,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=True,
    )

    def __init__(self, url: str, node_urls: list[str], retention: float = RETENTION) -> None:
        """``retention``: seconds an idle name's records are kept on each node."""
        self.url = url
        inbox = uuid.uuid4().hex  # one inbox on every node: one attempt id serves them all
        # Tokens start from a node's clock only when its counter is missing: the nodes'
        # clocks differ, and a floor on every grant would make their tokens disagree always.
        self._nodes = [RedisBackend(u, inbox, retention, clock_floor=False) for u in node_urls]
        self._majority = len(self._nodes) // 2 + 1
        # The request tables are used by the loop and by sync callers' threads (the direct
        # path), so every use holds _tables. A round itself belongs to one thread at a
        # time: the one running its acquire (a caller's thread until it hands the round
        # over in _begun, then the loop), and the loop only looks up a round's index.
        self._tables = threading.Lock()
        self._rounds: OrderedDict[str, _Round] = OrderedDict()  # request id -> its last round
        self._abandoned: OrderedDict[str, None] = OrderedDict()
        self._begun: OrderedDict[str, _Begun] = OrderedDict()  # request id -> its round
        self._background: set[asyncio.Future[Any]] = set()

    # --- connection -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to every node; a majority must answer."""
        replies = await self._fan(lambda i: self._nodes[i].open(), 5.0)
        self._check_reached(sum(1 for r in replies.values() if r is not _DOWN), "open")
        directs = [n.direct for n in self._nodes if isinstance(n.direct, RedisDirect)]
        if len(directs) == len(self._nodes):
            self.direct = _RedlockDirect(self, directs)

    async def ping(self) -> None:
        """Raise BackendUnavailable unless a majority of nodes answers."""
        replies = await self._fan(lambda i: self._nodes[i].ping(), node_timeout(1.0))
        self._check_reached(sum(1 for r in replies.values() if r is not _DOWN), "ping")

    async def aclose(self) -> None:
        """Finish background undo work and close every node."""
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(*(n.aclose() for n in self._nodes), return_exceptions=True)

    def _check_reached(self, reached: int, what: str, needed: int | None = None) -> None:
        needed = self._majority if needed is None else needed
        if reached < needed:
            raise BackendUnavailable(
                f"{self.url}: {what} reached {reached} of {len(self._nodes)} nodes; "
                f"{needed} are needed"
            )

    async def _fan(
        self,
        call: Callable[[int], Awaitable[T]],
        within: float,
        nodes: Iterable[int] | None = None,
    ) -> dict[int, T | _Down]:
        """Run ``call(i)`` for each node index in parallel, each bounded by ``within`` s."""

        async def one(i: int) -> T | _Down:
            try:
                async with asyncio.timeout(within):
                    return await call(i)
            except (BackendUnavailable, TimeoutError) as exc:
                log.debug("%s: %s", self._nodes[i].url, exc or "timed out")
                return _DOWN

        chosen = list(range(len(self._nodes))) if nodes is None else list(nodes)
        replies = await asyncio.gather(*(one(i) for i in chosen))
        return dict(zip(chosen, replies, strict=True))

    async def _fan_run(
        self, script: str, namespace: str, name: str, *args: str | int, within: float = 1.0
    ) -> dict[int, list[Any] | _Down]:
        return await self._fan(
            lambda i: self._nodes[i].run_script(script, namespace, name, *args), within
        )

    def _later(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- acquire ----------------------------------------------------------------------

    async def _acquire(self, req: AcquireRequest) -> Grant:
        base = req.request_id or uuid.uuid4().hex
        with self._tables:
            abandoned = base in self._abandoned
            begun = self._begun.pop(base, None)
        if abandoned:
            raise AcquireTimeout(f"{req.name!r} was not granted: this request was abandoned",
                                 name=req.name, owner=req.owner)  # fmt: skip
        current: list[_Round] = []
        return await undo_on_cancel(
            self._rounds_until_granted(req, base, current, begun),
            lambda: self._give_up(req, current[-1]) if current else None,
            self._background,
        )

    async def _rounds_until_granted(
        self, req: AcquireRequest, base: str, current: list[_Round], begun: _Begun | None
    ) -> Grant:
        """Rounds until one is granted; the first is ``begun``'s, if a sync caller's
        thread began it."""
        name, owner, ttl, wait = req.name, req.owner, req.ttl, req.wait
        started = time.monotonic() if begun is None else begun.round.started
        end = None if wait is None else time.monotonic() + wait
        woken = asyncio.Event() if begun is None else begun.woken
        timeout = node_timeout(ttl)
        if wait != 0 and begun is None:  # subscribe first, then ask: no wake-up is missed
            await self._fan(lambda i: self._nodes[i].listen(timeout), timeout)
        while True:
            rnd = self._next_round(base) if begun is None else begun.round
            current.append(rnd)
            for node in self._nodes:
                node.watch(rnd.attempt, woken)
            try:
                grant = await self._round(req, rnd, end, woken, stepped=begun is not None)
            finally:
                begun = None
                for node in self._nodes:
                    node.forget_attempt(rnd.attempt)
            if grant is not None:
                return Grant(name=name, owner=owner, token=grant.token, count=grant.count,
                             ttl=grant.ttl, waited=time.monotonic() - started)  # fmt: skip
            pause = random.uniform(*RETRY_DELAY)
            if end is not None and time.monotonic() + pause >= end:
                raise AcquireTimeout(f"{name!r} was not granted in time", name=name,
                                     owner=owner)  # fmt: skip
            await asyncio.sleep(pause)

    async def _round(
        self,
        req: AcquireRequest,
        rnd: _Round,
        end: float | None,
        woken: asyncio.Event,
        stepped: bool = False,
    ) -> Grant | None:
        """One attempt: a Grant, or None (undone on every node) to try again.
        ``stepped``: the first step was sent and its replies noted already."""
        namespace, name, owner, ttl, wait, limit = (
            req.namespace, req.name, req.owner, req.ttl, req.wait, req.limit
        )  # fmt: skip
        need = quorum(len(self._nodes), limit)

        async def give_up() -> None:
            await self._give_up(req, rnd)

        async def step(nodes: Iterable[int], mode: str) -> None:
            sent = time.monotonic()
            args = _acquire_args(req, rnd, mode)
            replies = await self._fan(
                lambda i: self._nodes[i].run_script("ACQUIRE", namespace, name, *args),
                node_timeout(ttl),
                nodes,
            )
            self._note_step(rnd, replies, sent)

        if not stepped:
            rnd.started = time.monotonic()
            await step(range(len(self._nodes)), _first_mode(wait))
        looked_again = False
        while True:
            if len(rnd.grants) >= need:
                grant = await self._confirm(namespace, name, owner, ttl, need, rnd)
                if grant is None:
                    await give_up()
                return grant
            if rnd.trouble or wait == 0 or len(self._nodes) - len(rnd.unreachable) < need:
                if "replaced" not in rnd.trouble.values():  # else the retry owns the request
                    await give_up()
                self._raise_for(rnd, name, owner, limit, need)
                return None  # our grant on a node ended or was replaced: start over
            if self._split(rnd, owner, need, limit):
                if looked_again:
                    await give_up()
                    return None
                looked_again = True
                await asyncio.sleep(random.uniform(*SPLIT_RECHECK))
                await step(self._pending(rnd), "wait")
                continue
            looked_again = False
            await self._pause(rnd, ttl, end, woken)
            if self._take_delivered(rnd) and len(rnd.grants) < need:
                # The other nodes' messages of the same release are likely on their way:
                # waiting a moment for them beats asking those nodes again.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DELIVERY_GRACE):
                        await woken.wait()
                woken.clear()
                self._take_delivered(rnd)
            if len(rnd.grants) >= need:
                continue
            if end is not None and time.monotonic() >= end:
                await step(self._pending(rnd), "leave")  # a grant made meanwhile still counts
                if len(rnd.grants) >= need:
                    continue
                await give_up()
                raise AcquireTimeout(
                    f"{name!r} was not granted in time; held by {self._holders_text(rnd)}",
                    name=name,
                    owner=owner,
                )
            await self._keep_partial(namespace, name, owner, ttl, rnd)
            await step(self._pending(rnd), "wait")

    @staticmethod
    async def _pause(rnd: _Round, ttl: float, end: float | None, woken: asyncio.Event) -> None:
        """Wait for a wake-up, the bounded re-check, the earliest holder expiry, the end of
        the wait, or the moment the nodes we already hold need extending."""
        now = time.monotonic()
        pause = CHECK_IN
        if rnd.next_expiry is not None:
            pause = min(pause, rnd.next_expiry - now + 0.002)
        if rnd.grants:
            pause = min(pause, min(g.ends for g in rnd.grants.values()) - ttl / 2 - now)
        if end is not None:
            pause = min(pause, end - now)
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await woken.wait()
        woken.clear()

    def _note_step(self, rnd: _Round, replies: dict[int, list[Any] | _Down], sent: float) -> None:
        """Record the nodes' replies to an acquire step sent at ``sent``."""
        rnd.next_expiry = None
        for i, reply in replies.items():
            self._note(rnd, i, reply, sent)

    def _note(self, rnd: _Round, i: int, reply: list[Any] | _Down, sent: float) -> None:
        """Record one node's reply to an acquire step."""
        rnd.unreachable.discard(i)
        rnd.holders.pop(i, None)
        if reply is _DOWN:
            rnd.unreachable.add(i)
            return
        assert isinstance(reply, list)
        status = reply[0]
        if status == "granted":
            rnd.grants[i] = _NodeGrant(int(reply[1]), int(reply[2]), sent + int(reply[3]) / 1000)
        elif status == "queued":
            rnd.holders[i] = [str(o) for o in reply[2]]
            if int(reply[1]) >= 0:
                expiry = time.monotonic() + int(reply[1]) / 1000
                rnd.next_expiry = min(expiry, rnd.next_expiry or expiry)
        elif status == "denied":
            rnd.denied = str(reply[1])
        elif status != "gone":
            rnd.trouble[i] = status if status != "invalid" else f"invalid {reply[1]}"
            if status == "lost":
                rnd.lost_token = max(int(reply[1]), rnd.lost_token or 0)

    def _take_delivered(self, rnd: _Round) -> int:
        """Count the grants that nodes sent by message, without asking them again.
        Returns how many were taken."""
        taken = 0
        for i in self._pending(rnd):
            reply = self._nodes[i].take_delivered(rnd.attempt)
            if reply is None or rnd.reused:  # a retry's queue time may predate the round
                continue
            taken += 1
            # The node queued us after this round's first request left, and the message
            # says how long (by its clock) it kept us queued: a lower bound on when.
            granted_at = rnd.started + int(reply[4]) / 1_000_000
            rnd.grants[i] = _NodeGrant(int(reply[1]), int(reply[2]),
                                       granted_at + int(reply[3]) / 1000)  # fmt: skip
            rnd.holders.pop(i, None)
        return taken

    def _pending(self, rnd: _Round) -> list[int]:
        return [i for i in range(len(self._nodes)) if i not in rnd.grants]

    @staticmethod
    def _split(rnd: _Round, owner: str, need: int, limit: int) -> bool:
        """True when we hold some nodes but fewer than ``limit`` other owners hold a quorum:
        the nodes may have granted different waiters, so that nobody can finish."""
        if not rnd.grants:
            return False
        counts: dict[str, int] = {}
        for holders in rnd.holders.values():
            for other in holders:
                if other != owner:
                    counts[other] = counts.get(other, 0) + 1
        return sum(1 for c in counts.values() if c >= need) < limit

    def _holders_text(self, rnd: _Round) -> str:
        owners = sorted({o for holders in rnd.holders.values() for o in holders})
        return ", ".join(owners) or "nobody"

    def _raise_for(self, rnd: _Round, name: str, owner: str, limit: int, need: int) -> None:
        """Raise why a round cannot go on, if it is final; return to try again."""
        for status in rnd.trouble.values():
            if status.startswith("invalid"):
                have = status.split()[1]
                raise InvalidRequest(
                    f"{name!r} is held with limit {have}; this request asks for limit {limit}",
                    name=name,
                    owner=owner,
                )
            if status in ("abandoned", "replaced"):
                why = "abandoned by its caller" if status == "abandoned" else "replaced by a retry"
                raise AcquireTimeout(f"{name!r} was not granted: this request was {why}",
                                     name=name, owner=owner)  # fmt: skip
            if status == "lost" and rnd.reused:
                raise LockLost("this request was granted before, and that hold has ended",
                               name=name, owner=owner, token=rnd.lost_token)  # fmt: skip
        self._check_reached(len(self._nodes) - len(rnd.unreachable), "acquire", need)
        if not rnd.trouble:  # a try (wait=0) that did not get a quorum
            raise AcquireTimeout(f"{name!r} is held by {rnd.denied or self._holders_text(rnd)}",
                                 name=name, owner=owner)  # fmt: skip

    async def _keep_partial(
        self, namespace: str, name: str, owner: str, ttl: float, rnd: _Round
    ) -> None:
        """Extend the nodes already granted to a waiter whose ttl is half gone."""
        now = time.monotonic()
        due = [i for i, g in rnd.grants.items() if g.ends - now < ttl / 2]
        if not due:
            return
        ttl_ms = max(1, round(ttl * 1000))
        sent = time.monotonic()
        replies = await self._fan(
            lambda i: self._nodes[i].run_script(
                "EXTEND", namespace, name, owner, rnd.grants[i].token, ttl_ms
            ),
            node_timeout(ttl),
            due,
        )
        for i, reply in replies.items():
            if isinstance(reply, list) and reply[0] == "granted":
                rnd.grants[i].ends = sent + int(reply[3]) / 1000
            elif isinstance(reply, list):
                del rnd.grants[i]
                rnd.trouble[i] = str(reply[0])

    async def _confirm(
        self, namespace: str, name: str, owner: str, ttl: float, need: int, rnd: _Round
    ) -> Grant | None:
        """Agree on one token across the granting nodes and check validity (or None)."""
        token, reentry = _agreed_token(rnd, need)
        if not reentry:
            lower = [i for i, g in rnd.grants.items() if g.count == 1 and g.token < token]
            if lower:
                replies = await self._fan(
                    lambda i: self._nodes[i].run_script(
                        "RAISE", namespace, name, owner, rnd.grants[i].token, token, rnd.rid
                    ),
                    node_timeout(ttl),
                    lower,
                )
                for i, reply in replies.items():
                    if isinstance(reply, list) and reply[0] == "ok":
                        rnd.grants[i].token = token
        settled = _settled(rnd, token, reentry, need, ttl)
        if settled is None:
            return None
        ours, validity = settled
        others = [i for i in range(len(self._nodes)) if i not in ours]
        if others:  # leave their queues, give back odd grants
            self._later(self._undo(namespace, name, owner, rnd.rid, ttl, others))
        count = max(g.count for g in ours.values())
        return Grant(name=name, owner=owner, token=token, count=count, ttl=validity)

    def _next_round(self, base: str) -> _Round:
        """The round to send for request id ``base``: a retry repeats the last round unless
        that one was given up. Any thread."""
        attempt = self._nodes[0].new_attempt()
        with self._tables:
            last = self._rounds.get(base)
            if last is None:
                rnd = _Round(base, 0, attempt)
            elif last.undone:
                rnd = _Round(base, last.index + 1, attempt)
            else:
                rnd = _Round(base, last.index, attempt, reused=True)
            self._remember(self._rounds, base, rnd)
        return rnd

    async def _give_up(self, req: AcquireRequest, rnd: _Round) -> None:
        """Undo a whole round on every node; the next try gets a new round."""
        rnd.undone = True
        await self._undo(req.namespace, req.name, req.owner, rnd.rid, req.ttl)

    async def _undo(
        self,
        namespace: str,
        name: str,
        owner: str,
        rid: str,
        ttl: float,
        nodes: Iterable[int] | None = None,
    ) -> None:
        """Undo request ``rid`` on the nodes: leave the queue, give back a grant."""
        await self._fan(
            lambda i: self._nodes[i].run_script("ABANDON", namespace, name, owner, rid),
            node_timeout(ttl),
            nodes,
        )

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        """Put ``key`` in one of the request tables, newest last (hold ``_tables``)."""
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_REMEMBERED:
            table.popitem(last=False)

    # --- the rest of the contract -----------------------------------------------------

    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        with self._tables:
            self._remember(self._abandoned, request_id, None)
            begun = self._begun.pop(request_id, None)
            last = self._rounds.get(request_id)
        if begun is not None:  # begun in a caller's thread, never taken up by the loop
            for node in self._nodes:
                node.forget_attempt(begun.round.attempt)
        rounds = 0 if last is None else last.index + 1
        rids = [f"{request_id}~{n}" for n in range(rounds + 1)]

        async def undo_all(i: int) -> None:
            for rid in rids:
                await self._nodes[i].run_script("ABANDON", namespace, name, owner, rid)

        replies = await self._fan(undo_all, 1.0)
        self._check_reached(sum(1 for r in replies.values() if r is not _DOWN), "abandon")

    async def _release(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        request_id: str | None,
        session: str | None,  # always None: Backend refuses sessions this store does not keep
    ) -> int:
        replies = await self._fan_run(
            "RELEASE", namespace, name, owner, token or 0, request_id or ""
        )
        return self._released(replies, name, owner, token)

    def _released(
        self, replies: dict[int, list[Any] | _Down], name: str, owner: str, token: int | None
    ) -> int:
        """The count left after a release that got ``replies``, or why it failed."""
        left = [int(r[1]) for r in replies.values() if isinstance(r, list) and r[0] == "ok"]
        if len(left) >= self._majority:
            return max(left)
        raise self._refusal(replies, len(left), self._majority, "release", name, owner, token)

    async def _extend(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        ttl: float,
        session: str | None,  # always None: Backend refuses sessions this store does not keep
    ) -> Grant:
        ttl_ms = max(1, round(ttl * 1000))
        sent = time.monotonic()
        replies = await self._fan_run(
            "EXTEND", namespace, name, owner, token or 0, ttl_ms, within=node_timeout(ttl)
        )
        granted = [r for r in replies.values() if isinstance(r, list) and r[0] == "granted"]
        limit = max((int(r[5]) for r in granted), default=1)
        need = quorum(len(self._nodes), limit)
        if len(granted) >= need:
            validity = _validity([sent + int(r[3]) / 1000 for r in granted], need, ttl)
            if validity <= 0:
                raise BackendUnavailable(f"{self.url}: extending {name!r} took too long")
            return Grant(name=name, owner=owner, token=max(int(r[1]) for r in granted),
                         count=max(int(r[2]) for r in granted), ttl=validity)  # fmt: skip
        raise self._refusal(replies, len(granted), need, "extend", name, owner, token)

    def _refusal(
        self,
        replies: dict[int, list[Any] | _Down],
        done: int,
        need: int,
        what: str,
        name: str,
        owner: str,
        token: int | None,
    ) -> LockError:
        """Why a release or extend reached fewer than ``need`` nodes."""
        down = sum(1 for r in replies.values() if r is _DOWN)
        if done + down >= need:  # the nodes that did not answer may still hold it
            return BackendUnavailable(
                f"{self.url}: {what} of {name!r} reached {len(replies) - down} of "
                f"{len(replies)} nodes; {need} are needed"
            )
        statuses = {r[0] for r in replies.values() if isinstance(r, list)}
        # The nodes judged by the same rules; the first rule any node matched wins, as on
        # one node ('not_yours': the token is another owner's live hold there).
        for status in ("not_yours", "revoked", "lost", "not_held"):
            if status in statuses:
                return not_held(status, name, owner, token)
        return LockLost(f"the hold of {name!r} is on too few nodes", name=name, owner=owner,
                        token=token)  # fmt: skip

    async def _inspect(self, namespace: str, name: str) -> ResourceInfo:
        replies = await self._fan_run("INSPECT", namespace, name)
        return self._merge_inspect(namespace, name, replies)

    def _merge_inspect(
        self, namespace: str, name: str, replies: dict[int, list[Any] | _Down]
    ) -> ResourceInfo:
        """One view from the nodes': holders and waiters a quorum of nodes agrees on."""
        answered = [r for r in replies.values() if isinstance(r, list)]
        self._check_reached(len(answered), "inspect")
        missing = len(self._nodes) - len(answered)
        limit = max(int(r[1]) for r in answered)
        rows: dict[str, list[HolderInfo]] = {}
        for reply in answered:
            for row in reply[3]:
                holder = holder_info(row)
                rows.setdefault(holder.owner, []).append(holder)
        need = max(1, quorum(len(self._nodes), limit) - missing)
        holders = []
        for owner, seen in rows.items():
            if len(seen) < need:
                continue
            seen.sort(key=lambda h: h.ttl_left, reverse=True)
            holders.append(HolderInfo(
                owner=owner,
                token=max(h.token for h in seen),
                count=max(h.count for h in seen),
                ttl_left=seen[need - 1].ttl_left,
                held_for=max(h.held_for for h in seen),
                acquired_at=min(h.acquired_at for h in seen),
            ))  # fmt: skip
        queued: dict[str, list[float]] = {}
        for reply in answered:
            for waiter_owner, waited in reply[4]:
                queued.setdefault(str(waiter_owner), []).append(int(waited) / 1_000_000)
        need_waiter = max(1, self._majority - missing)
        waiters = sorted(
            (
                WaiterInfo(owner=o, waited=max(w))
                for o, w in queued.items()
                if len(w) >= need_waiter
            ),
            key=lambda w: -w.waited,
        )
        return ResourceInfo(
            name=name,
            namespace=namespace,
            limit=limit,
            last_token=max(int(r[2]) for r in answered),
            holders=tuple(sorted(holders, key=lambda h: h.token)),
            waiters=tuple(waiters),
        )

    async def _list_locks(self, namespace: str, prefix: str) -> list[ResourceInfo]:
        replies = await self._fan(lambda i: self._nodes[i].names(namespace, prefix), 5.0)
        found = [r for r in replies.values() if isinstance(r, set)]
        self._check_reached(len(found), "list")
        names = sorted(set().union(*found))
        infos = [await self._inspect(namespace, name) for name in names]
        return [info for info in infos if info.holders or info.waiters]

    async def _force_release(
        self, namespace: str, name: str, owner: str | None
    ) -> list[HolderInfo]:
        replies = await self._fan_run("FORCE_RELEASE", namespace, name, owner or "")
        answered = [r for r in replies.values() if isinstance(r, list)]
        self._check_reached(len(answered), "force-release")
        evicted: dict[str, HolderInfo] = {}
        for reply in answered:
            for row in reply[1]:
                holder = holder_info(row)
                known = evicted.get(holder.owner)
                if known is None or holder.token > known.token:
                    evicted[holder.owner] = holder
        return sorted(evicted.values(), key=lambda h: h.token)


def _first_mode(wait: float | None) -> str:
    """The ACQUIRE mode of a round's first step."""
    return "try" if wait == 0 else "new"


def _acquire_args(req: AcquireRequest, rnd: _Round, mode: str) -> tuple[str | int, ...]:
    """ACQUIRE's arguments after the name, for one step of round ``rnd``."""
    ttl_ms = max(1, round(req.ttl * 1000))
    return (req.owner, rnd.rid, rnd.attempt, ttl_ms, req.limit, mode, WAITER_LEASE_MS)


def _agreed_token(rnd: _Round, need: int) -> tuple[int, bool]:
    """The token a round's grants settle on, and whether it is a re-entry: the owner's
    own token when ``need`` nodes re-entered one hold, else the highest token of a fresh
    grant. A hold re-entered on fewer nodes is not one the owner has (its undo failed):
    it is left out, and undone like any odd grant, rather than failing every round."""
    reentered = Counter(g.token for g in rnd.grants.values() if g.count > 1)
    if reentered:
        token, nodes = reentered.most_common(1)[0]
        if nodes >= need:
            return token, True
    fresh = [g.token for g in rnd.grants.values() if g.count == 1]
    return max(fresh or [g.token for g in rnd.grants.values()]), False


def _settled(
    rnd: _Round, token: int, reentry: bool, need: int, ttl: float
) -> tuple[dict[int, _NodeGrant], float] | None:
    """The nodes whose grants make up the round's hold on ``token`` (a re-entry's, or
    fresh ones) and its validity; None when they are too few or its validity is gone."""
    ours = {i: g for i, g in rnd.grants.items()
            if g.token == token and (reentry or g.count == 1)}  # fmt: skip
    if len(ours) < need:
        return None
    validity = _validity([g.ends for g in ours.values()], need, ttl)
    return None if validity <= 0 else (ours, validity)


class _RedlockDirect(DirectPath):
    """Acquire and release from a sync caller's thread, on each node's blocking
    connections (``RedisDirect``).

    A request goes to every node before any reply is read, so the nodes work in
    parallel, and every read is bounded by one deadline (:func:`node_timeout`). An
    acquire that one step settles cleanly (every node granted it with the same token,
    and it is still valid) ends here. Any other (queued, split, a node down or with
    another token) is handed to the I/O loop as it stands (ContinueOnLoop), which goes
    on exactly as with a round it sent itself; so is any acquire while a node's pub/sub
    subscription is not confirmed, before anything is sent.
    """

    def __init__(self, backend: RedlockBackend, nodes: list[RedisDirect]) -> None:
        from redis.exceptions import NoScriptError

        self._backend = backend
        self._nodes = nodes
        self._no_script = NoScriptError

    def acquire(self, req: AcquireRequest) -> Grant:
        backend = self._backend
        base = req.request_id or uuid.uuid4().hex
        if req.wait != 0 and not all(n.listening() for n in backend._nodes):
            raise ContinueOnLoop()  # the loop subscribes first: no wake-up is missed
        rnd = backend._next_round(base)
        woken = asyncio.Event()  # set from the loop; awaited there if the loop goes on
        for node in backend._nodes:
            node.watch(rnd.attempt, woken)
        rnd.started = time.monotonic()
        replies = self._fan("ACQUIRE", req.namespace, req.name,
                            _acquire_args(req, rnd, _first_mode(req.wait)),
                            node_timeout(req.ttl))  # fmt: skip
        backend._note_step(rnd, replies, rnd.started)
        grant = self._clean_grant(req, rnd)
        if grant is not None:
            for node in backend._nodes:
                node.forget_attempt(rnd.attempt)
            return grant
        with backend._tables:  # the round is the loop's from here on
            backend._remember(backend._begun, base, _Begun(rnd, woken))
        raise ContinueOnLoop()

    def _clean_grant(self, req: AcquireRequest, rnd: _Round) -> Grant | None:
        """The grant when every node granted with one token and it is valid, else None."""
        if len(rnd.grants) < len(self._nodes):
            return None
        need = quorum(len(self._nodes), req.limit)
        token, reentry = _agreed_token(rnd, need)
        settled = _settled(rnd, token, reentry, need, req.ttl)
        if settled is None or len(settled[0]) < len(self._nodes):
            return None
        ours, validity = settled
        return Grant(name=req.name, owner=req.owner, token=token,
                     count=max(g.count for g in ours.values()), ttl=validity,
                     waited=time.monotonic() - rnd.started)  # fmt: skip

    def release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
    ) -> int:
        replies = self._fan("RELEASE", namespace, name,
                            (owner, token or 0, request_id or ""), 1.0)  # fmt: skip
        return self._backend._released(replies, name, owner, token)

    def _fan(
        self, script: str, namespace: str, name: str, args: tuple[Any, ...], within: float
    ) -> dict[int, list[Any] | _Down]:
        """Send ``script`` to every node, then read the replies, all within ``within`` s.

        Nodes with an idle connection go first: making a new connection waits for the
        node's answer (a paused node's, up to the deadline), which must not hold back the
        others' requests."""
        deadline = time.monotonic() + within
        command = self._backend._nodes[0].evalsha(script, namespace, name, args)
        replies: dict[int, list[Any] | _Down] = {}
        sent: dict[int, Any] = {}
        order = sorted(range(len(self._nodes)), key=lambda i: not self._nodes[i].has_idle())
        try:
            for i in order:
                node = self._nodes[i]
                try:
                    sent[i] = node.send(command, _left(deadline))
                except BackendUnavailable:
                    replies[i] = _DOWN
            for i in list(sent):
                conn = sent.pop(i)
                replies[i] = self._reply(i, script, command, conn, deadline)
        finally:
            for i, conn in sent.items():  # left unread by an unexpected error
                self._nodes[i].drop(conn)
        return dict(sorted(replies.items()))

    def _reply(
        self, i: int, script: str, command: tuple[Any, ...], conn: Any, deadline: float
    ) -> list[Any] | _Down:
        node = self._nodes[i]
        try:
            try:
                return list(node.receive(conn, _left(deadline)))
            except self._no_script:  # the node restarted or flushed its scripts
                node.load(script)
                return list(node.receive(node.send(command, _left(deadline)), _left(deadline)))
        except BackendUnavailable as exc:
            log.debug("%s: %s", self._backend._nodes[i].url, exc)
            return _DOWN


def _left(deadline: float) -> float:
    """Seconds until ``deadline``; a little more than none, since 0 would not block."""
    return max(deadline - time.monotonic(), 0.001)


class _Down:
    """A node that did not answer in time."""

    def __repr__(self) -> str:
        return "<no answer>"


_DOWN = _Down()


def parse_nodes(url: str) -> tuple[str, list[str]]:
    """Split ``redlock://[user:pass@]h1:p1,h2:p2,...[/db][?opts]`` into its display URL
    (password hidden) and one ``redis://`` URL per node."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",")]
    if len(nodes) < 3 or any(not h or ":" not in h for h in nodes):
        raise InvalidRequest(
            f"a RedLock URL names at least 3 nodes as host:port, e.g. "
            f"redlock://h1:6379,h2:6379,h3:6379, not {redact_url(url)!r}"
        )
    if len(set(nodes)) != len(nodes):
        raise InvalidRequest("a RedLock URL names each node once")
    auth = f"{credentials}@" if credentials else ""
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    node_urls = [f"redis://{auth}{host}{tail}" for host in nodes]
    return redact_url(f"redlock://{auth}{','.join(nodes)}{parts.path}"), node_urls
