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
node's grant (a pub/sub message on the I/O loop; for a sync caller, a BLPOP on the node's
wake list in the caller's own thread), and checks in with the same bounded re-check as
``redis://``. One body of logic decides each round (``_round_steps``, a generator of the
I/O it needs), carried out by the I/O loop (``_drive``) or by a sync caller's thread
(``_RedlockDirect``).
Requests sent at nearly the same moment can reach two nodes in different orders; then the
nodes may grant different waiters so that nobody holds a quorum. A waiter that holds some
nodes while no other owner holds a quorum looks again after a short random pause, and if
the split remains it gives its nodes back and queues again after a random delay.

Tokens. Every node has its own counter; a grant's token is the highest one its granting
nodes gave. When they disagree, the lower nodes are raised to it (the RAISE script)
before the grant is reported, so a quorum of nodes has counted to the token. Any later
grant's quorum shares a node with it and so gets a higher token. This holds as long as
nodes keep their counters: with ``appendfsync always``. A node that restarts empty can
let a later token be lower than an earlier one.

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
import dataclasses
import logging
import random
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from lockd.backends import redact_url, redis_lua
from lockd.backends import redis as redis_backend
from lockd.backends.base import AcquireRequest, Backend, DirectPath, undo_on_cancel
from lockd.backends.redis import LIST_WAKE, RedisBackend, _holder, _not_held, _RedisDirect
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
WAITER_LEASE_MS = round(redis_backend.WAITER_LEASE * 1000)
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


# A round's steps are a generator of the I/O they need, so that one body of logic runs
# both on the I/O loop and in a sync caller's thread (each with a driver of its own).


@dataclass(frozen=True, slots=True)
class _Send:
    """Run ``script`` on the nodes of ``args`` (node -> its arguments after the name) in
    parallel, each within ``within`` s. The driver answers {node: reply or _DOWN}."""

    script: str
    namespace: str
    name: str
    args: Mapping[int, tuple[str | int, ...]]
    within: float


@dataclass(frozen=True, slots=True)
class _Sleep:
    """Pause ``seconds``. The driver answers None."""

    seconds: float


@dataclass(frozen=True, slots=True)
class _Wait:
    """Wait up to ``seconds`` for grants of ``attempt`` from ``nodes``: until the first,
    or with ``every`` until one from each. The driver leaves each grant in its node's
    ``_delivered`` and answers None."""

    seconds: float
    attempt: str
    nodes: tuple[int, ...]
    every: bool = False


@dataclass(frozen=True, slots=True)
class _Later:
    """Carry out ``send`` once the steps are over, without waiting for its outcome (undo
    work that must not delay a grant)."""

    send: _Send


_Step = _Send | _Sleep | _Wait | _Later
_Steps = Generator[_Step, Any, T]


class RedlockBackend(Backend):
    """Locks on N independent Redis nodes by majority (``redlock://h1:p1,h2:p2,h3:p3``)."""

    capabilities = Capabilities(
        safety=SafetyLevel.TIMING_DEPENDENT,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=True,
    )

    def __init__(self, url: str, node_urls: list[str]) -> None:
        self.url = url
        inbox = uuid.uuid4().hex  # one inbox on every node: one attempt id serves them all
        self._nodes = [RedisBackend(u, inbox) for u in node_urls]
        self._majority = len(self._nodes) // 2 + 1
        self._rounds: OrderedDict[str, _Round] = OrderedDict()  # request id -> its last round
        self._abandoned: OrderedDict[str, None] = OrderedDict()
        self._background: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the I/O loop, once open

    # --- connection -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to every node; a majority must answer."""
        self._loop = asyncio.get_running_loop()
        replies = await self._fan(lambda i: self._nodes[i].open(), 5.0)
        self._check_reached(sum(1 for r in replies.values() if r is not _DOWN), "open")
        directs = [n.direct for n in self._nodes if isinstance(n.direct, _RedisDirect)]
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
            lambda i: self._nodes[i]._run(script, namespace, name, *args), within
        )

    def _later(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _later_from_thread(self, send: _Send) -> None:
        """Carry out ``send`` in the background on the I/O loop (called from any thread)."""
        assert self._loop is not None  # a direct path exists only once open
        self._loop.call_soon_threadsafe(lambda: self._later(self._perform(send, None)))

    # --- acquire ----------------------------------------------------------------------

    async def _acquire(self, req: AcquireRequest) -> Grant:
        base = req.request_id or uuid.uuid4().hex
        current: list[_Round] = []
        return await undo_on_cancel(
            self._acquire_on_loop(req, base, current),
            lambda: self._give_up(req, current[-1]) if current else None,
            self._background,
        )

    async def _acquire_on_loop(
        self, req: AcquireRequest, base: str, current: list[_Round]
    ) -> Grant:
        woken = asyncio.Event()
        if req.wait != 0:  # subscribe first, then ask: no wake-up is missed
            timeout = node_timeout(req.ttl)
            await self._fan(lambda i: self._nodes[i]._listen(timeout), timeout)
        return await self._drive(self._acquire_steps(req, base, current, woken), woken)

    def _acquire_steps(
        self, req: AcquireRequest, base: str, current: list[_Round], woken: asyncio.Event | None
    ) -> _Steps[Grant]:
        """Rounds until one is granted (or the wait ends). ``woken``: the event that grant
        messages set, on the I/O loop; None: the driver pops them from wake lists."""
        name, owner, wait = req.name, req.owner, req.wait
        if base in self._abandoned:
            raise AcquireTimeout(f"{name!r} was not granted: this request was abandoned",
                                 name=name, owner=owner)  # fmt: skip
        started = time.monotonic()
        end = None if wait is None else started + wait
        while True:
            rnd = self._next_round(base, list_wake=woken is None)
            current.append(rnd)
            if woken is not None:
                for node in self._nodes:
                    node._wake[rnd.attempt] = woken
            try:
                grant = yield from self._round_steps(req, rnd, end)
            finally:
                for node in self._nodes:
                    node._forget_attempt(rnd.attempt)
            if grant is not None:
                return dataclasses.replace(grant, waited=time.monotonic() - started)
            pause = random.uniform(*RETRY_DELAY)
            if end is not None and time.monotonic() + pause >= end:
                raise AcquireTimeout(f"{name!r} was not granted in time", name=name,
                                     owner=owner)  # fmt: skip
            yield _Sleep(pause)

    def _round_steps(
        self, req: AcquireRequest, rnd: _Round, end: float | None
    ) -> _Steps[Grant | None]:
        """One attempt: a Grant, or None (undone on every node) to try again."""
        namespace, name, owner, ttl, wait, limit = (
            req.namespace, req.name, req.owner, req.ttl, req.wait, req.limit
        )  # fmt: skip
        need = quorum(len(self._nodes), limit)

        def step(nodes: Iterable[int], mode: str) -> _Steps[None]:
            args = _acquire_args(req, rnd, mode)
            sent = time.monotonic()
            replies = yield _Send("ACQUIRE", namespace, name, dict.fromkeys(nodes, args),
                                  node_timeout(ttl))  # fmt: skip
            self._note_step(rnd, replies, sent)

        def give_up() -> _Send:
            rnd.undone = True
            return self._undo_send(req, rnd.rid)

        rnd.started = time.monotonic()
        yield from step(range(len(self._nodes)), "try" if wait == 0 else "new")
        looked_again = False
        while True:
            if len(rnd.grants) >= need:
                grant = yield from self._confirm_steps(req, need, rnd)
                if grant is None:
                    yield give_up()
                return grant
            if rnd.trouble or wait == 0 or len(self._nodes) - len(rnd.unreachable) < need:
                if "replaced" not in rnd.trouble.values():  # else the retry owns the request
                    yield give_up()
                self._raise_for(rnd, name, owner, limit, need)
                return None  # our grant on a node ended or was replaced: start over
            if self._split(rnd, owner, need, limit):
                if looked_again:
                    yield give_up()
                    return None
                looked_again = True
                yield _Sleep(random.uniform(*SPLIT_RECHECK))
                yield from step(self._pending(rnd), "wait")
                continue
            looked_again = False
            yield self._wait_for_grants(rnd, _pause(rnd, ttl, end))
            if self._take_delivered(rnd) and len(rnd.grants) < need:
                # The other nodes' grants of the same release are likely on their way:
                # waiting a moment for all of them beats asking those nodes again, and
                # spares undoing a grant that came a moment late.
                yield self._wait_for_grants(rnd, DELIVERY_GRACE, every=True)
                self._take_delivered(rnd)
            if len(rnd.grants) >= need:
                continue
            if end is not None and time.monotonic() >= end:
                yield from step(self._pending(rnd), "leave")  # a grant made meanwhile counts
                if len(rnd.grants) >= need:
                    continue
                yield give_up()
                raise AcquireTimeout(
                    f"{name!r} was not granted in time; held by {self._holders_text(rnd)}",
                    name=name,
                    owner=owner,
                )
            yield from self._keep_partial_steps(req, rnd)
            yield from step(self._pending(rnd), "wait")

    def _wait_for_grants(self, rnd: _Round, seconds: float, every: bool = False) -> _Wait:
        nodes = tuple(i for i in self._pending(rnd) if i not in rnd.unreachable)
        return _Wait(seconds, rnd.attempt, nodes, every)

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
            reply = self._nodes[i]._delivered.pop(rnd.attempt, None)
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

    def _keep_partial_steps(self, req: AcquireRequest, rnd: _Round) -> _Steps[None]:
        """Extend the nodes already granted to a waiter whose ttl is half gone."""
        now = time.monotonic()
        due = [i for i, g in rnd.grants.items() if g.ends - now < req.ttl / 2]
        if not due:
            return
        ttl_ms = max(1, round(req.ttl * 1000))
        args = {i: (req.owner, rnd.grants[i].token, ttl_ms) for i in due}
        sent = time.monotonic()
        replies = yield _Send("EXTEND", req.namespace, req.name, args, node_timeout(req.ttl))
        for i, reply in replies.items():
            if isinstance(reply, list) and reply[0] == "granted":
                rnd.grants[i].ends = sent + int(reply[3]) / 1000
            elif isinstance(reply, list):
                del rnd.grants[i]
                rnd.trouble[i] = str(reply[0])

    def _confirm_steps(self, req: AcquireRequest, need: int, rnd: _Round) -> _Steps[Grant | None]:
        """Agree on one token across the granting nodes and check validity (or None)."""
        namespace, name, owner, ttl = req.namespace, req.name, req.owner, req.ttl
        token, reentry = _agreed_token(rnd, need)
        if not reentry:
            lower = [i for i, g in rnd.grants.items() if g.count == 1 and g.token < token]
            if lower:
                args = {i: (owner, rnd.grants[i].token, token, rnd.rid) for i in lower}
                replies = yield _Send("RAISE", namespace, name, args, node_timeout(ttl))
                for i, reply in replies.items():
                    if isinstance(reply, list) and reply[0] == "ok":
                        rnd.grants[i].token = token
        ours = {i: g for i, g in rnd.grants.items()
                if g.token == token and (reentry or g.count == 1)}  # fmt: skip
        if len(ours) < need:
            return None
        validity = _validity([g.ends for g in ours.values()], need, ttl)
        if validity <= 0:
            return None
        others = [i for i in range(len(self._nodes)) if i not in ours]
        if others:  # leave their queues, give back odd grants
            yield _Later(self._undo_send(req, rnd.rid, others))
        count = max(g.count for g in ours.values())
        return Grant(name=name, owner=owner, token=token, count=count, ttl=validity)

    def _next_round(self, base: str, list_wake: bool) -> _Round:
        """The round to send for request id ``base``: a retry repeats the last round unless
        that one was given up. ``list_wake``: its grants are pushed to wake lists."""
        last = self._rounds.get(base)
        attempt = (LIST_WAKE if list_wake else "") + self._nodes[0].new_attempt()
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
        await self._perform(self._undo_send(req, rnd.rid), None)

    def _undo_send(
        self, req: AcquireRequest, rid: str, nodes: Iterable[int] | None = None
    ) -> _Send:
        """Undo request ``rid`` on the nodes (all by default): leave the queue, give back a
        grant."""
        chosen = range(len(self._nodes)) if nodes is None else nodes
        return _Send("ABANDON", req.namespace, req.name, dict.fromkeys(chosen, (req.owner, rid)),
                     node_timeout(req.ttl))  # fmt: skip

    # --- carrying out steps on the I/O loop ------------------------------------------

    async def _drive(self, steps: _Steps[T], woken: asyncio.Event) -> T:
        """Carry out ``steps`` on the I/O loop and return what they come to."""
        try:
            answer: Any = None
            while True:
                try:
                    step = steps.send(answer)
                except StopIteration as done:
                    return cast(T, done.value)
                answer = await self._perform(step, woken)
        finally:
            steps.close()

    async def _perform(self, step: _Step, woken: asyncio.Event | None) -> Any:
        if isinstance(step, _Send):
            return await self._fan(
                lambda i: self._nodes[i]._run(
                    step.script, step.namespace, step.name, *step.args[i]
                ),
                step.within,
                step.args,
            )
        if isinstance(step, _Wait):
            assert woken is not None
            await self._wait(step, woken)
        elif isinstance(step, _Sleep):
            await asyncio.sleep(step.seconds)
        else:
            self._later(self._perform(step.send, None))
        return None

    async def _wait(self, step: _Wait, woken: asyncio.Event) -> None:
        """Wait for grant messages as ``step`` says; they arrive through pub/sub."""
        deadline = time.monotonic() + step.seconds
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await woken.wait()
            woken.clear()
            if not step.every or all(step.attempt in self._nodes[i]._delivered for i in step.nodes):
                break
        woken.clear()

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_REMEMBERED:
            table.popitem(last=False)

    # --- the rest of the contract -----------------------------------------------------

    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        self._remember(self._abandoned, request_id, None)
        last = self._rounds.get(request_id)
        rounds = 0 if last is None else last.index + 1
        rids = [f"{request_id}~{n}" for n in range(rounds + 1)]

        async def undo_all(i: int) -> None:
            for rid in rids:
                await self._nodes[i]._run("ABANDON", namespace, name, owner, rid)

        replies = await self._fan(undo_all, 1.0)
        self._check_reached(sum(1 for r in replies.values() if r is not _DOWN), "abandon")

    async def _release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
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
        self, namespace: str, name: str, owner: str, token: int | None, ttl: float
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
        for status in ("revoked", "lost", "not_held"):
            if status in statuses:
                return _not_held(status, name, owner, token)
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
                holder = _holder(row)
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
        replies = await self._fan(lambda i: self._nodes[i]._names(namespace, prefix), 5.0)
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
                holder = _holder(row)
                known = evicted.get(holder.owner)
                if known is None or holder.token > known.token:
                    evicted[holder.owner] = holder
        return sorted(evicted.values(), key=lambda h: h.token)


def _acquire_args(req: AcquireRequest, rnd: _Round, mode: str) -> tuple[str | int, ...]:
    """ACQUIRE's arguments after the name, for one step of round ``rnd``."""
    ttl_ms = max(1, round(req.ttl * 1000))
    return (req.owner, rnd.rid, rnd.attempt, ttl_ms, req.limit, mode, WAITER_LEASE_MS)


def _agreed_token(rnd: _Round, need: int) -> tuple[int, bool]:
    """The token a round's grants settle on, and whether it is a re-entry: the owner's
    own token when ``need`` nodes re-entered one hold, else the highest token of a fresh
    grant. A hold re-entered on fewer nodes is not one the owner has (its undo failed):
    it is left out, and undone like any odd grant, rather than blocking every round."""
    reentered = Counter(g.token for g in rnd.grants.values() if g.count > 1)
    if reentered:
        token, nodes = reentered.most_common(1)[0]
        if nodes >= need:
            return token, True
    fresh = [g.token for g in rnd.grants.values() if g.count == 1]
    return max(fresh or [g.token for g in rnd.grants.values()]), False


def _pause(rnd: _Round, ttl: float, end: float | None) -> float:
    """Seconds to wait for a grant before looking again: the bounded re-check, the
    earliest holder expiry, the end of the wait, or the moment the nodes we already hold
    need extending, whichever comes first."""
    now = time.monotonic()
    pause = redis_backend.CHECK_IN
    if rnd.next_expiry is not None:
        pause = min(pause, rnd.next_expiry - now + 0.002)
    if rnd.grants:
        pause = min(pause, min(g.ends for g in rnd.grants.values()) - ttl / 2 - now)
    if end is not None:
        pause = min(pause, end - now)
    return pause


class _RedlockDirect(DirectPath):
    """Acquire and release from a sync caller's thread, on each node's blocking
    connections (``_RedisDirect``), carrying out the same steps as the I/O loop.

    A request goes to every node before any reply is read, so the nodes work in
    parallel, and every read is bounded by one deadline (:func:`node_timeout`). A round's
    attempt id starts with ``LIST_WAKE``, so each node pushes its grant to a wake list,
    which this thread pops with a BLPOP on each node it waits for (:class:`_Pops`). Undo
    work after a grant (``_Later``) goes to the I/O loop, which carries it out in the
    background as for its own grants: the grant does not wait for it, and a slow node
    delays nobody.
    """

    def __init__(self, backend: RedlockBackend, nodes: list[_RedisDirect]) -> None:
        self._backend = backend
        self._nodes = nodes

    def acquire(self, req: AcquireRequest) -> Grant:
        backend = self._backend
        base = req.request_id or uuid.uuid4().hex
        steps = backend._acquire_steps(req, base, [], None)
        pops = _Pops(self._nodes, req.namespace, req.name, node_timeout(req.ttl))
        later: list[_Send] = []
        try:
            answer: Any = None
            while True:
                try:
                    step = steps.send(answer)
                except StopIteration as done:
                    return cast(Grant, done.value)
                if isinstance(step, _Send):
                    answer = self._fan(step)
                    continue
                if isinstance(step, _Wait):
                    pops.wait(step, [n._delivered for n in backend._nodes])
                elif isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                else:
                    later.append(step.send)
                answer = None
        finally:
            steps.close()
            for send in later:
                backend._later_from_thread(send)
            pops.close()

    def release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
    ) -> int:
        replies = self._fan(_Send("RELEASE", namespace, name,
                                  dict.fromkeys(range(len(self._nodes)),
                                                (owner, token or 0, request_id or "")),
                                  1.0))  # fmt: skip
        return self._backend._released(replies, name, owner, token)

    def _fan(self, send: _Send) -> dict[int, list[Any] | _Down]:
        """Send a script to its nodes, then read the replies, all within its deadline."""
        deadline = time.monotonic() + send.within
        node_backends = self._backend._nodes
        replies: dict[int, list[Any] | _Down] = {}
        sent: dict[int, tuple[tuple[Any, ...], Any]] = {}
        # Nodes that need a new connection go last, a failing one last of all: setting
        # one up to a node that hangs takes until the deadline, and the others' requests
        # are on their way meanwhile.
        order = sorted(send.args, key=lambda i: self._nodes[i].readiness())
        try:
            for i in order:
                command = node_backends[i]._evalsha(
                    send.script, send.namespace, send.name, send.args[i]
                )
                try:
                    sent[i] = (command, self._nodes[i].send(command, _left(deadline)))
                except BackendUnavailable:
                    replies[i] = _DOWN
            for i in list(sent):
                command, conn = sent.pop(i)
                replies[i] = self._reply(i, send.script, command, conn, deadline)
        finally:
            for i, (_, conn) in sent.items():  # left unread by an unexpected error
                self._nodes[i].drop(conn)
        return dict(sorted(replies.items()))

    def _reply(
        self, i: int, script: str, command: tuple[Any, ...], conn: Any, deadline: float
    ) -> list[Any] | _Down:
        node = self._nodes[i]
        try:
            try:
                return list(node.receive(conn, _left(deadline)))
            except node._no_script:  # the node restarted or flushed its scripts
                node._execute(("SCRIPT", "LOAD", getattr(redis_lua, script)))
                return list(node.receive(node.send(command, _left(deadline)), _left(deadline)))
        except BackendUnavailable as exc:
            log.debug("%s: %s", self._backend._nodes[i].url, exc)
            return _DOWN


class _Pops:
    """A sync acquire's BLPOPs on the nodes' wake lists, each on a connection of its own.

    A BLPOP still open when a wait ends serves the next wait of the same round. One
    left from an earlier round, or still open when the acquire ends, is left unread: its
    connection is reused once the BLPOP ends (the undo of a node that did not grant in
    time wakes it at once).
    """

    def __init__(self, nodes: list[_RedisDirect], namespace: str, name: str, within: float):
        self._nodes = nodes
        self._namespace = namespace
        self._name = name
        self._within = within
        """Seconds a node may take to set up a new connection."""
        self._open: dict[int, tuple[str, Any]] = {}  # node -> (attempt, connection)

    def wait(self, step: _Wait, delivered: list[dict[str, list[Any]]]) -> None:
        """Pop grants as ``step`` says, leaving each in its node's ``delivered``."""
        deadline = time.monotonic() + step.seconds
        for i, (attempt, conn) in list(self._open.items()):
            if attempt != step.attempt:  # an earlier round's
                del self._open[i]
                self._nodes[i].leave_unread(conn, redis_backend.CHECK_IN + self._within)
        wake_list = redis_backend._wake_list(self._namespace, self._name, step.attempt)
        woke = False
        while (left := deadline - time.monotonic()) > 0:
            for i in step.nodes:
                if i not in self._open and step.attempt not in delivered[i]:
                    blpop = ("BLPOP", wake_list, f"{max(left, 0.01):.3f}")  # 0: without end
                    try:
                        self._open[i] = (step.attempt, self._nodes[i].send(blpop, self._within))
                    except BackendUnavailable:
                        continue  # the next step finds the node down
            if not self._open:
                time.sleep(left)
                return
            for i, popped in self._replies(left):
                if popped:  # not BLPOP's own timeout
                    woke = True
                    grant = redis_backend._delivered_grant(popped[1])
                    if grant is not None:
                        delivered[i][step.attempt] = grant
            if woke and (not step.every or all(step.attempt in delivered[i] for i in step.nodes)):
                return

    def close(self) -> None:
        """Leave the open BLPOPs to be read when they end (their connections are reused)."""
        for i, (_, conn) in self._open.items():
            self._nodes[i].leave_unread(conn, redis_backend.CHECK_IN + self._within)
        self._open.clear()

    def _replies(self, timeout: float) -> Iterator[tuple[int, Any]]:
        """The replies of the open BLPOPs that come within ``timeout`` (the first)."""
        if not self._open:
            return
        conns = {i: conn for i, (_, conn) in self._open.items()}
        for i in _RedisDirect.readable(conns, timeout):
            del self._open[i]
            try:
                yield i, self._nodes[i].receive(conns[i])
            except BackendUnavailable:
                continue


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
