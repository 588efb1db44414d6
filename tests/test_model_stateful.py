"""Model-based tests: the memory and file backends, driven directly, against a pure model.

(At the end: ``ConcurrentMachine``, several owners at once on the memory store, with
acquires left waiting across steps, timeouts, cancellations, abandons and retries.)

A hypothesis state machine per backend tries acquires (``wait=0``), releases, extends,
force-releases, retries of earlier requests (same request id), reads, and moves a fake
store clock by hand; the file machine also restarts its store (``aclose`` and reopen of
the same path, same clock). After each step the backend's answer must be the model's:
the grant's token, count and ttl, or the exact error class.

The model (``Model``) is small on purpose: per name, ``owner -> hold(token, count,
expires)``; one table-wide token counter; revoked tokens; remembered request ids. A hold
is alive while ``expires > now``. Clock steps and ttls are dyadic fractions, so every
float below is exact and expiry boundaries are hit exactly.

A restart may move a surviving hold's expiry (the store cannot know how long it was
down), but only within the contract: never earlier than it was (safety), never more than
the hold's ttl from the restart (liveness), and a hold that had already ended stays ended.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import lockd.backends.memory as memory_module
from lockd.backends.file import FileBackend
from lockd.backends.memory import LocalBackend, MemoryBackend
from lockd.errors import (
    AcquireTimeout,
    BackendUnavailable,
    InvalidRequest,
    LockError,
    LockLost,
    NotHeld,
    Revoked,
)
from lockd.model import Grant
from tests.faults.filewriter import Gate

T = TypeVar("T")

NS = "default"
LIMITS = {"a": 1, "b": 1, "s": 2}
"""Two locks and a semaphore of two."""
NAMES = sorted(LIMITS)
OWNERS = ["o1", "o2", "o3"]
TTLS = [0.5, 1.0, 2.0, 4.0]
STEPS = [0.25, 0.5, 1.0, 2.0, 4.5]
START = 1024.0

names = st.sampled_from(NAMES)
owners = st.sampled_from(OWNERS)
ttls = st.sampled_from(TTLS)
# "known": the token the model knows for the owner's hold; None: no token; an int: any
# token, usually a wrong one (issued to someone else, ended, or never issued).
tokens = st.one_of(st.just("known"), st.none(), st.integers(1, 24))


class FakeClock:
    """The store's monotonic clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class MHold:
    token: int
    count: int
    expires: float
    max_ttl: float
    """The longest ttl asked for this hold: a restart may not give it more than that."""


Outcome = tuple[int, int, float] | type[LockError]
"""(token, count, ttl) of a grant, or the error class the call must raise."""


@dataclass
class Model:
    holds: dict[str, dict[str, MHold]] = field(default_factory=lambda: {n: {} for n in NAMES})
    limits: dict[str, int] = field(default_factory=dict)
    last_token: int = 0
    last_of: dict[str, int] = field(default_factory=dict)
    """Each name's last token (the store reports it per name)."""
    revoked: dict[str, set[int]] = field(default_factory=lambda: {n: set() for n in NAMES})
    """Each name's force-released tokens."""
    evicted: dict[str, set[str]] = field(default_factory=lambda: {n: set() for n in NAMES})
    """Each name's owners whose latest hold there was force-released."""
    requests: dict[tuple[str, str, str, str], int] = field(default_factory=dict)

    def live(self, name: str, now: float) -> dict[str, MHold]:
        """The holds of ``name`` at ``now``; ended ones are dropped."""
        holds = self.holds[name]
        for owner in [o for o, h in holds.items() if h.expires <= now]:
            del holds[owner]
        return holds

    def error_for(self, name: str, owner: str, token: int | None, now: float) -> type[NotHeld]:
        """The per-name judgement of a call that matched no hold (first rule wins)."""
        if token is None:
            return Revoked if owner in self.evicted[name] else NotHeld
        if token in {h.token for o, h in self.live(name, now).items() if o != owner}:
            return NotHeld  # someone else's live token: not a hold that ended
        if token in self.revoked[name]:
            return Revoked
        if 0 < token <= self.last_of.get(name, 0):
            return LockLost
        return NotHeld

    def acquire(
        self, name: str, owner: str, ttl: float, limit: int, now: float, rid: str | None
    ) -> tuple[Outcome, bool]:
        """The outcome, and whether it is a fresh grant (a new token)."""
        holds = self.live(name, now)
        key = ("acquire", name, owner, rid or "")
        if rid is not None and key in self.requests:
            hold = holds.get(owner)
            if hold is None or hold.token != self.requests[key]:
                return LockLost, False
            return (hold.token, hold.count, hold.expires - now), False
        if holds and self.limits[name] != limit:
            return InvalidRequest, False
        fresh = False
        hold = holds.get(owner)
        if hold is not None:
            hold.count += 1
            hold.expires = max(hold.expires, now + ttl)
            hold.max_ttl = max(hold.max_ttl, ttl)
        elif len(holds) < limit:
            self.limits[name] = limit
            self.last_token += 1
            self.last_of[name] = self.last_token
            hold = holds[owner] = MHold(self.last_token, 1, now + ttl, ttl)
            self.evicted[name].discard(owner)
            fresh = True
        else:
            return AcquireTimeout, False
        if rid is not None:
            self.requests[key] = hold.token
        return (hold.token, hold.count, hold.expires - now), fresh

    def find(self, name: str, owner: str, token: int | None, now: float) -> MHold | None:
        hold = self.live(name, now).get(owner)
        if hold is None or (token is not None and hold.token != token):
            return None
        return hold

    def release(
        self, name: str, owner: str, token: int | None, now: float, rid: str | None
    ) -> int | type[NotHeld]:
        key = ("release", name, owner, rid or "")
        if rid is not None and key in self.requests:
            return self.requests[key]
        hold = self.find(name, owner, token, now)
        if hold is None:
            return self.error_for(name, owner, token, now)
        hold.count -= 1
        if hold.count == 0:
            del self.holds[name][owner]
        if rid is not None:
            self.requests[key] = hold.count
        return hold.count

    def extend(self, name: str, owner: str, token: int | None, ttl: float, now: float) -> Outcome:
        hold = self.find(name, owner, token, now)
        if hold is None:
            return self.error_for(name, owner, token, now)
        hold.expires = now + ttl
        hold.max_ttl = max(hold.max_ttl, ttl)
        return (hold.token, hold.count, ttl)


@dataclass(frozen=True)
class Sent:
    """A request that carried a request id, kept to be retried verbatim."""

    op: str
    name: str
    owner: str
    token: int | None
    ttl: float
    limit: int
    rid: str


class BackendMachine(RuleBasedStateMachine):
    """Rules shared by every backend; subclasses say how to open the store."""

    def __init__(self) -> None:
        super().__init__()
        # The slow sweep runs on real time and would drop expired holds at moments the
        # test does not choose; keep it out so every run is a function of the steps.
        self._sweep_interval = memory_module.SWEEP_INTERVAL
        memory_module.SWEEP_INTERVAL = 1e9
        self.clock = FakeClock()
        self.runner = asyncio.Runner()
        self.model = Model()
        self.fresh_tokens: dict[str, list[int]] = {n: [] for n in NAMES}
        self.sent: list[Sent] = []
        self.rid_seq = 0
        self.backend: LocalBackend = self.open()

    def open(self) -> LocalBackend:
        raise NotImplementedError

    def teardown(self) -> None:
        try:
            self.runner.run(self.backend.aclose())
        finally:
            self.runner.close()
            memory_module.SWEEP_INTERVAL = self._sweep_interval

    # --- helpers --------------------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T]) -> T | LockError:
        """Run one backend call in this machine's private loop; errors are returned."""
        try:
            return self.runner.run(coro)
        except LockError as exc:
            return exc

    def new_rid(self, use: bool) -> str | None:
        if not use:
            return None
        self.rid_seq += 1
        return f"req-{self.rid_seq}"

    def pick_token(self, name: str, owner: str, choice: int | str | None) -> int | None:
        if choice != "known":
            assert not isinstance(choice, str)
            return choice
        hold = self.model.holds[name].get(owner)
        return hold.token if hold is not None else self.model.last_token + 1

    def check_grant(self, got: Grant | LockError, want: Outcome, name: str, owner: str) -> None:
        event("grant" if isinstance(got, Grant) else type(got).__name__)
        if isinstance(want, type):
            assert isinstance(got, LockError), f"expected {want.__name__}, got {got!r}"
            assert type(got) is want, f"expected {want.__name__}, got {got!r}"
            return
        assert isinstance(got, Grant), f"expected a grant {want}, got {got!r}"
        token, count, ttl = want
        assert (got.name, got.owner) == (name, owner)
        assert (got.token, got.count, got.ttl) == (token, count, ttl), (got, want)
        assert got.waited == 0.0

    def do_acquire(self, name: str, owner: str, ttl: float, limit: int, rid: str | None) -> None:
        got = self.call(
            self.backend.acquire(NS, name, owner, ttl=ttl, wait=0, limit=limit, request_id=rid)
        )
        want, fresh = self.model.acquire(name, owner, ttl, limit, self.clock.now, rid)
        self.check_grant(got, want, name, owner)
        if fresh:
            assert isinstance(got, Grant)
            self.fresh_tokens[name].append(got.token)

    def do_release(self, name: str, owner: str, token: int | None, rid: str | None) -> None:
        got = self.call(self.backend.release(NS, name, owner, token, rid))
        want = self.model.release(name, owner, token, self.clock.now, rid)
        event(f"release: {type(got).__name__}")
        if isinstance(want, int):
            assert got == want, f"release expected count {want}, got {got!r}"
        else:
            assert type(got) is want, f"release expected {want.__name__}, got {got!r}"

    # --- rules --------------------------------------------------------------------------

    @rule(name=names, owner=owners, ttl=ttls, with_rid=st.booleans())
    def try_acquire(self, name: str, owner: str, ttl: float, with_rid: bool) -> None:
        rid = self.new_rid(with_rid)
        limit = LIMITS[name]
        if rid is not None:
            self.sent.append(Sent("acquire", name, owner, None, ttl, limit, rid))
        self.do_acquire(name, owner, ttl, limit, rid)

    @rule(name=names, owner=owners, ttl=ttls)
    def try_acquire_with_wrong_limit(self, name: str, owner: str, ttl: float) -> None:
        """Refused while the name is held with its own limit; else it sets a new limit."""
        self.do_acquire(name, owner, ttl, 3 - LIMITS[name], None)

    @rule(name=names, owner=owners, choice=tokens, with_rid=st.booleans())
    def release(self, name: str, owner: str, choice: int | str | None, with_rid: bool) -> None:
        token = self.pick_token(name, owner, choice)
        rid = self.new_rid(with_rid)
        if rid is not None:
            self.sent.append(Sent("release", name, owner, token, 0.0, 0, rid))
        self.do_release(name, owner, token, rid)

    @rule(name=names, owner=owners, choice=tokens, ttl=ttls)
    def extend(self, name: str, owner: str, choice: int | str | None, ttl: float) -> None:
        token = self.pick_token(name, owner, choice)
        got = self.call(self.backend.extend(NS, name, owner, token, ttl))
        want = self.model.extend(name, owner, token, ttl, self.clock.now)
        self.check_grant(got, want, name, owner)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """Send an earlier request again with its request id: it applies once."""
        sent = data.draw(st.sampled_from(self.sent))
        if sent.op == "acquire":
            self.do_acquire(sent.name, sent.owner, sent.ttl, sent.limit, sent.rid)
        else:
            self.do_release(sent.name, sent.owner, sent.token, sent.rid)

    @rule(name=names, owner=st.one_of(st.none(), owners))
    def force_release(self, name: str, owner: str | None) -> None:
        got = self.call(self.backend.force_release(NS, name, owner))
        holds = self.model.live(name, self.clock.now)
        evicted = sorted((o, h.token) for o, h in holds.items() if owner in (None, o))
        for o, token in evicted:
            del holds[o]
            self.model.revoked[name].add(token)
            self.model.evicted[name].add(o)
        assert not isinstance(got, LockError), got
        assert sorted((h.owner, h.token) for h in got) == evicted

    @rule(step=st.sampled_from(STEPS))
    def advance_time(self, step: float) -> None:
        self.clock.now += step

    @rule(name=names)
    def inspect(self, name: str) -> None:
        info = self.call(self.backend.inspect(NS, name))
        assert not isinstance(info, LockError), info
        now = self.clock.now
        want = sorted(
            (o, h.token, h.count, h.expires - now) for o, h in self.model.live(name, now).items()
        )
        got = sorted((h.owner, h.token, h.count, h.ttl_left) for h in info.holders)
        assert got == want, f"holders of {name!r}: store {got}, model {want}"
        assert info.last_token == self.model.last_of.get(name, 0)
        if info.holders:
            assert info.limit == self.model.limits[name]
            assert len(info.holders) <= info.limit
        assert info.waiters == ()

    @rule()
    def list_locks(self) -> None:
        infos = self.call(self.backend.list_locks(NS))
        assert not isinstance(infos, LockError), infos
        now = self.clock.now
        want = {
            name: sorted((o, h.token) for o, h in self.model.live(name, now).items())
            for name in NAMES
        }
        got = {info.name: sorted((h.owner, h.token) for h in info.holders) for info in infos}
        assert got == {name: holders for name, holders in want.items() if holders}

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def never_more_than_limit_holders(self) -> None:
        for name in NAMES:
            holds = self.model.live(name, self.clock.now)
            if holds:
                assert len(holds) <= self.model.limits[name]

    @invariant()
    def tokens_strictly_increase_per_name(self) -> None:
        for name, seen in self.fresh_tokens.items():
            assert all(a < b for a, b in itertools.pairwise(seen)), (name, seen)
            assert all(t <= self.model.last_token for t in seen)


class MemoryMachine(BackendMachine):
    def open(self) -> LocalBackend:
        return MemoryBackend("memory://model", clock=self.clock)


class FileMachine(BackendMachine):
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lockd-model-")
        try:
            super().__init__()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def open(self) -> LocalBackend:
        backend = FileBackend(self.dir, clock=self.clock)
        self.runner.run(backend.open())
        return backend

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule()
    def restart(self) -> None:
        """Close the store and open it again: holds, tokens, revocations, request ids stay."""
        self.runner.run(self.backend.aclose())
        self.backend = self.open()
        now = self.clock.now
        for name in NAMES:
            info = self.call(self.backend.inspect(NS, name))
            assert not isinstance(info, LockError), info
            live = self.model.live(name, now)
            got = sorted((h.owner, h.token, h.count) for h in info.holders)
            want = sorted((o, h.token, h.count) for o, h in live.items())
            assert got == want, (
                f"after restart {name!r} is held by {got}; before it, by {want} "
                "(a hold that had ended came back, or a live one was lost)"
            )
            assert info.last_token == self.model.last_of.get(name, 0)
            for holder in info.holders:
                hold = live[holder.owner]
                assert holder.ttl_left >= hold.expires - now, (
                    f"restart shortened {name!r} of {holder.owner}: "
                    f"{hold.expires - now}s left before, {holder.ttl_left}s after"
                )
                assert holder.ttl_left <= hold.max_ttl, (
                    f"restart gave {name!r} of {holder.owner} {holder.ttl_left}s, "
                    f"more than its ttl {hold.max_ttl}s"
                )
                hold.expires = now + holder.ttl_left


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestMemoryBackendModel = MemoryMachine.TestCase
TestMemoryBackendModel.settings = SETTINGS
TestFileBackendModel = FileMachine.TestCase
TestFileBackendModel.settings = SETTINGS


# --- the smallest cases the file machine has found, as plain tests ----------------------------


async def test_file_restart_does_not_bring_back_an_ended_hold(tmp_path: Path) -> None:
    """A hold that ended before a restart stays ended, even if nobody looked at it since.

    Contract item 2: after its ttl, the owner's extend and release fail with "lost".
    """
    clock = FakeClock()
    store = FileBackend(tmp_path, clock=clock)
    await store.open()
    try:
        grant = await store.acquire(NS, "a", "o1", ttl=0.5, wait=0)
        clock.now += 1.0  # the hold ended at +0.5 by the store's clock
    finally:
        await store.aclose()
    store = FileBackend(tmp_path, clock=clock)
    await store.open()
    try:
        assert (await store.inspect(NS, "a")).holders == ()
        with pytest.raises(LockLost):
            await store.extend(NS, "a", "o1", grant.token, 5.0)
    finally:
        await store.aclose()


async def test_file_restart_never_shortens_a_reentered_hold(tmp_path: Path) -> None:
    """o1 holds for 4 s, re-enters with ttl 0.5 (expiry stays at 4 s), the store restarts:
    o2 must not get the lock 1 s later."""
    clock = FakeClock()
    store = FileBackend(tmp_path, clock=clock)
    await store.open()
    try:
        await store.acquire(NS, "a", "o1", ttl=4.0, wait=0)
        again = await store.acquire(NS, "a", "o1", ttl=0.5, wait=0)
        assert again.ttl == 4.0
    finally:
        await store.aclose()
    store = FileBackend(tmp_path, clock=clock)
    await store.open()
    try:
        clock.now += 1.0
        with pytest.raises(AcquireTimeout):
            await store.acquire(NS, "a", "o2", ttl=1.0, wait=0)
    finally:
        await store.aclose()


# --- several owners at once: waits, timeouts, cancellations, abandons, retries ----------------

CNAMES = {"a": 1, "s": 2}
"""A lock and a semaphore of two."""
COWNERS = ["o1", "o2", "o3", "o4"]
MODES = {"now": 0.0, "wait": None, "short": 0.01}
"""An acquire's wait: try once, wait without end, or a wait that ends at the next
``let_waits_end`` (real time: the store's clock is the fake one, a wait is the loop's)."""


@dataclass
class Attempt:
    """One acquire as its caller sees it."""

    name: str
    owner: str
    rid: str
    task: asyncio.Task[Grant]
    queued: bool = False
    """Still waiting after the step that started it (so it joined the queue)."""
    outcome: Grant | BaseException | None = None
    abandoned: bool = False


class ConcurrentMachine(RuleBasedStateMachine):
    """Several owners on the memory store at once, acquires left running across steps.

    The test knows what each caller was told (grants, counts left) and checks after every
    step that the store holds exactly that (so nothing granted was lost and no retry
    applied twice), that no name has more holders than its limit, that each name's new
    tokens rise, and that no waiter was granted while one queued before it still waited.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sweep_interval = memory_module.SWEEP_INTERVAL
        memory_module.SWEEP_INTERVAL = 1e9
        self.clock = FakeClock()
        self.runner = asyncio.Runner()
        self.backend: LocalBackend = self.open()
        self.attempts: list[Attempt] = []
        self.believed: dict[tuple[str, str], tuple[int, int, float]] = {}
        """(name, owner) -> (token, count, expires) as the callers were told."""
        self.tokens: dict[str, list[int]] = {n: [] for n in CNAMES}
        self.rid_seq = 0

    def open(self) -> LocalBackend:
        return MemoryBackend("memory://concurrent", clock=self.clock)

    def teardown(self) -> None:
        try:
            for attempt in self.attempts:
                attempt.task.cancel()
            self.spin()
            self.runner.run(self.backend.aclose())
        finally:
            self.runner.close()
            memory_module.SWEEP_INTERVAL = self._sweep_interval

    # --- helpers --------------------------------------------------------------------------

    def spin(self, seconds: float = 0.0) -> None:
        """Let the loop run every step that is ready (and ``seconds`` of real time)."""

        async def run() -> None:
            if seconds:
                await asyncio.sleep(seconds)
            await self.quiet()

        self.runner.run(run())
        self.collect()

    async def quiet(self) -> None:
        """Return once the store has nothing more to do without a new call."""
        for _ in range(8):
            await asyncio.sleep(0)

    def collect(self) -> None:
        """Record what finished attempts were told, in the order the store granted them."""
        now = self.clock.now
        finished = [a for a in self.attempts if a.outcome is None and a.task.done()]
        granted: list[Attempt] = []
        for attempt in finished:
            task = attempt.task
            attempt.outcome = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if attempt.outcome is None:
                attempt.outcome = task.result()
                granted.append(attempt)
        for attempt in sorted(granted, key=self._token):
            grant = attempt.outcome
            assert isinstance(grant, Grant)
            if attempt.queued:  # FIFO: nobody queued before it on this name still waits
                before = self.attempts[: self.attempts.index(attempt)]
                waiting = [b.owner for b in before if b.name == attempt.name and b.queued
                           and b.outcome is None]  # fmt: skip
                assert not waiting, f"{attempt.owner} was granted before {waiting} queued earlier"
            old = self.believed.get((attempt.name, attempt.owner))
            if old is None or old[2] <= now or old[0] != grant.token:
                self.tokens[attempt.name].append(grant.token)
            self.believed[(attempt.name, attempt.owner)] = (grant.token, grant.count,
                                                           now + grant.ttl)  # fmt: skip
        for attempt in finished:
            if isinstance(attempt.outcome, LockError):
                assert isinstance(attempt.outcome, AcquireTimeout | BackendUnavailable), (
                    attempt.outcome
                )

    @staticmethod
    def _token(attempt: Attempt) -> int:
        assert isinstance(attempt.outcome, Grant)
        return attempt.outcome.token

    def live(self) -> dict[tuple[str, str], tuple[int, int, float]]:
        now = self.clock.now
        self.believed = {k: v for k, v in self.believed.items() if v[2] > now}
        return self.believed

    # --- rules ----------------------------------------------------------------------------

    @rule(name=st.sampled_from(sorted(CNAMES)), owner=st.sampled_from(COWNERS), ttl=ttls,
          mode=st.sampled_from(sorted(MODES)))  # fmt: skip
    def acquire(self, name: str, owner: str, ttl: float, mode: str) -> None:
        self.rid_seq += 1
        rid = f"c-{self.rid_seq}"
        coro = self.backend.acquire(NS, name, owner, ttl=ttl, wait=MODES[mode],
                                    limit=CNAMES[name], request_id=rid)  # fmt: skip
        attempt = Attempt(name, owner, rid, self.runner.get_loop().create_task(coro))
        self.attempts.append(attempt)
        self.spin()
        attempt.queued = attempt.outcome is None

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        (name, owner), (token, count, expires) = data.draw(
            st.sampled_from(sorted(self.live().items()))
        )
        left = self.runner.run(self.backend.release(NS, name, owner, token))
        assert left == count - 1
        if left:
            self.believed[(name, owner)] = (token, left, expires)
        else:
            del self.believed[(name, owner)]
        self.spin()

    @rule()
    def let_waits_end(self) -> None:
        self.spin(seconds=0.02)

    @precondition(lambda self: any(a.outcome is None for a in self.attempts))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """A waiting caller is cancelled (Ctrl-C, a task cancelled)."""
        attempt = data.draw(st.sampled_from([a for a in self.attempts if a.outcome is None]))
        attempt.task.cancel()
        self.spin()

    @precondition(lambda self: bool(self.attempts))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        """A caller that cannot know what its acquire reached abandons its request id."""
        attempt = data.draw(st.sampled_from(self.attempts))
        granted = isinstance(attempt.outcome, Grant) and not attempt.abandoned
        self.runner.run(self.backend.abandon(NS, attempt.name, attempt.owner, attempt.rid))
        attempt.abandoned = True
        self.spin()
        key = (attempt.name, attempt.owner)
        held = self.live().get(key)
        given_back = isinstance(attempt.outcome, Grant) and granted and held is not None
        if given_back and held is not None and held[0] == self._token(attempt):  # once
            token, count, expires = held
            if count > 1:
                self.believed[key] = (token, count - 1, expires)
            else:
                del self.believed[key]

    @precondition(lambda self: any(isinstance(a.outcome, Grant) for a in self.attempts))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A granted acquire sent again with its request id: applied once."""
        attempt = data.draw(st.sampled_from([a for a in self.attempts
                                             if isinstance(a.outcome, Grant)]))  # fmt: skip
        got = self.call_acquire(attempt)
        held = self.live().get((attempt.name, attempt.owner))
        assert isinstance(attempt.outcome, Grant)
        if attempt.abandoned:
            assert isinstance(got, AcquireTimeout), got
        elif held is not None and held[0] == attempt.outcome.token:
            assert isinstance(got, Grant), got
            assert (got.token, got.count) == held[:2], (got, held)
        else:
            assert isinstance(got, LockLost), got

    def call_acquire(self, attempt: Attempt) -> Grant | LockError:
        coro = self.backend.acquire(NS, attempt.name, attempt.owner, ttl=1.0, wait=0,
                                    limit=CNAMES[attempt.name], request_id=attempt.rid)  # fmt: skip
        try:
            return self.runner.run(coro)
        except LockError as exc:
            return exc
        finally:
            self.spin()

    @rule(step=st.sampled_from(STEPS))
    def advance_time(self, step: float) -> None:
        self.clock.now += step
        self.runner.run(self.backend.sweep())
        self.spin()

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def the_store_holds_what_callers_were_told(self) -> None:
        for name, limit in CNAMES.items():
            info = self.runner.run(self.backend.inspect(NS, name))
            got = sorted((h.owner, h.token, h.count) for h in info.holders)
            want = sorted((o, t, c) for (n, o), (t, c, _) in self.live().items() if n == name)
            assert got == want, f"{name!r}: the store holds {got}, callers were told {want}"
            assert len(got) <= limit

    @invariant()
    def the_names_with_waiters_are_kept_track_of(self) -> None:
        table = self.backend._table
        queued = {key for key in table._resources if table.waiters_of(key)}
        assert set(table.waiting_keys()) == queued

    @invariant()
    def new_tokens_rise_per_name(self) -> None:
        for name, seen in self.tokens.items():
            assert all(a < b for a, b in itertools.pairwise(seen)), (name, seen)


class ConcurrentFileMachine(ConcurrentMachine):
    """The same on the file store, with outages: a write fails (a full disk), the store
    goes out of service, and it is opened again. What callers were told must survive."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lockd-concurrent-")
        self.gate = Gate()
        try:
            super().__init__()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def open(self) -> LocalBackend:
        self.gate = Gate()
        backend = FileBackend(self.dir, clock=self.clock, sync="normal", gate=self.gate)
        self.runner.run(backend.open())
        return backend

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def quiet(self) -> None:
        """Also wait for the writer: each step is answered only once it is on disk."""
        assert isinstance(self.backend, FileBackend)
        for _ in range(1000):
            await super().quiet()
            if self.backend._drained.is_set():
                return
            await self.backend._drained.wait()
        raise AssertionError("the file store never went quiet")

    @rule(name=st.sampled_from(sorted(CNAMES)), owner=st.sampled_from(COWNERS))
    def outage(self, name: str, owner: str) -> None:
        """The next write fails: everyone still waiting hears BackendUnavailable, then a
        restart brings back every hold a caller was told of (with at least what it had left)."""
        self.gate.fail()
        self.acquire(name, owner, 1.0, "now")  # fails if it writes; else it did not count
        with pytest.raises(BackendUnavailable):  # a grant of a free name always writes
            self.runner.run(self.backend.acquire(NS, "free", owner, ttl=1.0, wait=0))
        self.spin()
        for attempt in self.attempts:
            if attempt.outcome is None:
                assert attempt.task.done(), f"{attempt.owner} still waits on a failed store"
        self.runner.run(self.backend.aclose())
        self.backend = self.open()
        now = self.clock.now
        for (n, o), (token, count, expires) in self.live().items():
            info = self.runner.run(self.backend.inspect(NS, n))
            (held,) = [h for h in info.holders if h.owner == o]
            assert (held.token, held.count) == (token, count)
            assert held.ttl_left >= expires - now
            self.believed[(n, o)] = (token, count, now + held.ttl_left)


TestConcurrentModel = ConcurrentMachine.TestCase
TestConcurrentModel.settings = settings(SETTINGS, max_examples=50)  # real sleeps: keep it short
TestConcurrentFileModel = ConcurrentFileMachine.TestCase
TestConcurrentFileModel.settings = settings(SETTINGS, max_examples=30)
