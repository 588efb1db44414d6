"""A client's holds and their watchdog. Everything here runs on the I/O loop.

Theory of operation. Each (name, owner) this client holds has one :class:`HoldState`:
its token, reentrant count, and its lease as a :class:`~lockd._lease.LeaseState` (the
local deadline, the renewal schedule and the state, decided without I/O; a grant's
anchor also counts the time the store says the request waited in its queue). This
module only drives it: it sends the requests, arms the timers, and tells the listeners.

The watchdog renews at about ttl/3: a timer until then, and a task only while a renewal
is in flight, so a short hold costs one timer set and cancelled. A failed renewal moves
the hold to ``at_risk`` and is retried with backoff until the local deadline; then the
hold is ``lost``. A store answer that the hold is gone ends it at once (``lost``, or
``revoked`` after a force-release). Ending sets the ``lost`` event and calls the
listeners; the next acquire, extend or release of that hold raises. Release stops
renewal before it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from lockd._lease import (
    DRIFT,
    LOSSES,
    RETRY_FIRST,
    RETRY_MAX,
    LeaseState,
)
from lockd._runtime import Call, Runtime, quietly
from lockd.backends import Backend
from lockd.backends.base import AcquireRequest, ContinueOnLoop
from lockd.errors import (
    AcquireTimeout,
    BackendUnavailable,
    ClientClosed,
    LockLost,
    NotHeld,
    Revoked,
    StoreRefused,
)
from lockd.model import Grant, LockState

__all__ = ["HoldState", "Session"]

log = logging.getLogger("lockd")

ADOPT_FRACTION = 1 / 6
"""Holds granted in a caller's thread get their renewal timer within this fraction of
their ttl (well before a renewal is due at RENEW_FRACTION)."""

T = TypeVar("T")
Listener = Callable[["HoldState"], None]


@dataclass(frozen=True, slots=True)
class Want:
    """What a lock asks of one acquire (and of the hold it gets)."""

    name: str
    owner: str
    ttl: float
    wait: float | None
    """Seconds to queue; None: without end; 0: try once."""
    limit: int
    renew: bool
    listener: Listener | None


_lost_guard = threading.Lock()  # a hold's state against the creation of its ``lost`` event


class _RequestIds:
    """Request ids no other request carries: a random prefix and a count (cheaper than
    a uuid4 per call). A forked child draws a new prefix."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        """Start afresh with a new random prefix."""
        self.prefix = os.urandom(8).hex()
        self.count = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}-{next(self.count)}"


_request_id = _RequestIds()
os.register_at_fork(after_in_child=_request_id.renew)


class HoldState(LeaseState):
    """The SDK's view of one owner's hold on one name (readable from any thread)."""

    def __init__(self, name: str, owner: str, ttl: float, grant: Grant, anchor: float) -> None:
        super().__init__(ttl, anchor, grant.ttl)
        self.name = name
        self.owner = owner
        self.token = grant.token
        self.count = 1
        """This session's acquires of the store's hold not yet released (an owner shared
        with another client may have more there, which that client gives back)."""
        self.undrained = 0
        """Counts given up here that may still be at the store (see ``Session._drain``)."""
        self._lost: threading.Event | None = None
        self.listeners: list[Listener] = []
        self.timer: asyncio.TimerHandle | None = None
        """Starts the next renewal (or, with renewal off, the ttl check)."""
        self.renewer: asyncio.Task[None] | None = None
        """The renewal in flight, if any."""
        self.releasing = False
        """A release is on its way from a caller's thread: start no renewal."""
        self.reported = False
        """The end of this hold was raised to the caller once (the next acquire starts afresh)."""

    @property
    def lost(self) -> threading.Event:
        """Set once the hold is lost or revoked (made on first use: most holds never ask)."""
        with _lost_guard:
            if self._lost is None:
                self._lost = threading.Event()
                if self.state in LOSSES:
                    self._lost.set()
            return self._lost

    def end(self, state: LockState, reason: str) -> bool:
        """End the hold (see LeaseState.end); a loss also sets ``lost``."""
        with _lost_guard:
            if not super().end(state, reason):
                return False
            lost = self._lost
        if lost is not None and state in LOSSES:
            lost.set()
        return True

    def disarm(self) -> None:
        """Cancel the timer of the next renewal (or ttl check), if set."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def error(self) -> NotHeld:
        """The error an operation on an ended hold raises."""
        cls = Revoked if self.state is LockState.REVOKED else LockLost
        return cls(f"{self.name!r} was {self.state.value}: {self.reason}",
                   name=self.name, owner=self.owner, token=self.token)  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"<HoldState {self.name!r} owner={self.owner!r} token={self.token} {self.state.value}>"
        )


class Session:
    """Acquire, extend and release through one backend, and keep the holds alive.

    Its coroutines run on the I/O loop. When the backend has a direct path, sync
    callers acquire and release in their own thread (``acquire_now``, ``release_now``);
    what needs the loop then (a queued wait, a retry, renewal) is handed to it.
    """

    def __init__(self, backend: Backend, namespace: str, rt: Runtime, label: str = "") -> None:
        self.backend = backend
        self.namespace = namespace
        self.label = label or type(backend).__name__
        """Names the store in log lines (a redacted URL)."""
        self._rt = rt
        self._holds: dict[tuple[str, str], HoldState] = {}
        self._guard = threading.Lock()  # the fields below, shared by callers and the loop
        self._unwatched: list[HoldState] = []
        """Holds granted in callers' threads, waiting for the loop to set their timers."""
        self._sweep_every = math.inf
        """Seconds between the loop's looks at ``_unwatched`` (inf: not looking)."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._cleanups: dict[tuple[str, str], asyncio.Task[None]] = {}
        """Per (name, owner): undoing at the store a hold or request given up here."""
        self._acquiring: set[asyncio.Task[Any]] = set()
        """The tasks of acquires under way on the loop (closing cancels them)."""
        self.closed = False

    def hold(self, name: str, owner: str) -> HoldState | None:
        """The current hold state of (name, owner), if this session knows one."""
        with self._guard:
            return self._holds.get((name, owner))

    def holds(self) -> list[HoldState]:
        """Every hold this session knows."""
        with self._guard:
            return list(self._holds.values())

    def check_open(self) -> None:
        """Raise ClientClosed once the client was closed."""
        if self.closed:
            raise ClientClosed("this client is closed; open a new one")

    def _ended_first(self, want: Want) -> bool:
        """Before an acquire: raise the end of a hold nested code still counts on, once.

        After that one raise the acquire goes on for a new hold. Returns True when an
        ended hold is known (so the acquire needs the loop, which undoes it first).
        """
        self.check_open()
        known = self.hold(want.name, want.owner)
        if known is None or not known.ended:
            return False
        if known.count > 0 and not known.reported:
            known.reported = True
            raise known.error()
        return True

    async def acquire(
        self, want: Want, request_id: str | None = None, sent: float | None = None
    ) -> HoldState:
        """Acquire (or re-enter) and start the watchdog; ClientClosed once closing began."""
        task = asyncio.current_task()
        assert task is not None
        self._acquiring.add(task)
        try:
            return await self._acquire(want, request_id, sent)
        except asyncio.CancelledError:
            if self.closed:  # closing cancelled it; the store has undone it
                raise ClientClosed("this client was closed while acquiring") from None
            raise
        finally:
            self._acquiring.discard(task)

    async def _acquire(self, want: Want, request_id: str | None, sent: float | None) -> HoldState:
        """Acquire (or re-enter) and start the watchdog.

        A request the store may have applied without our hearing (BackendUnavailable)
        is retried with the same request id, so it is applied once; one given up on is
        abandoned at the store. ``request_id`` and ``sent`` continue an acquire begun in
        a caller's thread. A grant that re-enters a hold this session gave up on, or
        whose lease ended before its answer came, is given back and asked for anew.
        """
        self._ended_first(want)
        name, owner, wait = want.name, want.owner, want.wait
        start = time.monotonic() if sent is None else sent
        end = None if wait is None else start + wait
        await self._cleaned((name, owner), end)
        rid = request_id or _request_id()
        first = sent  # a continued acquire's first attempt was sent from the caller's thread
        begun = start
        """When the attempt whose answer counts was sent: the lease is counted from there."""

        def attempt() -> Awaitable[Grant]:
            nonlocal begun, first
            begun, first = (time.monotonic() if first is None else first), None
            left = None if end is None else max(0.0, end - time.monotonic())
            return self.backend.acquire(self.namespace, name, owner, ttl=want.ttl,
                                        wait=left, limit=want.limit, request_id=rid)  # fmt: skip

        while True:
            try:
                grant = await _retrying(
                    attempt,
                    None if wait is None else start + max(wait, RETRY_MAX),
                    f"acquiring {name!r} on {self.label}",
                )
            except BackendUnavailable as exc:
                if not isinstance(exc, StoreRefused):  # it may wait in the queue, or be granted
                    self._undo_soon((name, owner), self._abandon(name, owner, rid, want.ttl))
                raise
            known = self.hold(name, owner)
            stale = (
                known is not None
                and known.ended
                and known.token == grant.token
                and known.undrained > 0
            )
            anchor = _granted_at(start, begun, grant)
            if self.closed:  # granted as the client closes: nobody will renew it
                await self._release_all(name, owner, grant.token, 1)
                self.check_open()
            if not stale and _lease_end(anchor, grant) > time.monotonic():
                # No await below: a cancellation must not land between the grant and its record.
                return self._record(grant, want, anchor)
            # An orphan of ours re-entered, or a lease already over: never hand it out.
            # Give back this grant's count, and the orphan's unless its drain still runs.
            with self._guard:
                draining = (name, owner) in self._cleanups
            orphaned = 0 if known is None or draining else known.undrained
            await self._release_all(name, owner, grant.token, 1 + orphaned)
            if known is not None and orphaned:
                known.undrained = 0
            rid = _request_id()
            if end is not None and time.monotonic() >= end:
                raise AcquireTimeout(f"{name!r} was not granted in time", name=name, owner=owner)

    def acquire_now(self, want: Want) -> HoldState | None:
        """Acquire from a sync caller's thread through the backend's direct path.

        None: make this acquire through the I/O loop instead (no direct path, a
        re-entry, whose record the loop updates, or an ended hold to undo first).
        """
        direct = self.backend.direct
        if direct is None or self._ended_first(want):
            return None
        name, owner = want.name, want.owner
        key = (name, owner)
        with self._guard:
            if key in self._holds or key in self._cleanups:
                return None
        sent = time.monotonic()
        rid = _request_id()
        try:
            grant = direct.acquire(AcquireRequest(self.namespace, name, owner, want.ttl,
                                                  want.wait, want.limit, rid))  # fmt: skip
        except (BackendUnavailable, ContinueOnLoop) as exc:
            if isinstance(exc, StoreRefused):
                raise

            async def give_back(_: HoldState) -> None:
                await self.release(name, owner)

            retry = self.acquire(want, request_id=rid, sent=sent)
            try:
                return Call(self._rt, retry, give_back=give_back).result()
            except ClientClosed:  # closed before the loop took the request up
                self._abandon_soon(name, owner, rid, want.ttl)
                raise
            except Exception:
                raise
            except BaseException:  # interrupted, maybe before the loop took the request up
                self._abandon_soon(name, owner, rid, want.ttl)
                raise
        except AcquireTimeout:
            self.check_open()  # closed while it waited: say so
            raise
        except BaseException:  # interrupted: the store may have applied it, so undo it
            self._abandon_soon(name, owner, rid, want.ttl)
            raise
        if self.closed:  # granted as the client closes: nobody will renew it
            with contextlib.suppress(NotHeld, BackendUnavailable):
                direct.release(self.namespace, name, owner, grant.token, _request_id())
            self.check_open()
        anchor = _granted_at(sent, sent, grant)
        if _lease_end(anchor, grant) <= time.monotonic():  # answered after the lease was over
            self._abandon_soon(name, owner, rid, want.ttl)
            return None  # the loop path asks anew once that is undone
        return self._record(grant, want, anchor)

    def _abandon_soon(self, name: str, owner: str, rid: str, ttl: float) -> None:
        """Have the loop undo acquire ``rid``, whatever the store made of it."""
        key = (name, owner)
        self._rt.loop.call_soon_threadsafe(
            lambda: self._undo_soon(key, self._abandon(name, owner, rid, ttl))
        )

    async def _abandon(self, name: str, owner: str, rid: str, ttl: float) -> None:
        await _retrying(
            lambda: self.backend.abandon(self.namespace, name, owner, rid),
            time.monotonic() + max(ttl, RETRY_MAX),
            f"abandoning a request for {name!r} on {self.label}",
        )

    async def _release_all(self, name: str, owner: str, token: int, count: int) -> None:
        """Give back ``count`` counts of the store's hold ``token`` (taken here)."""
        for _ in range(max(1, count)):
            try:
                left = await self.backend.release(self.namespace, name, owner, token)
            except NotHeld:
                return
            if left == 0:
                return

    async def _drain(self, hold: HoldState) -> None:
        """Release at the store the counts of a hold given up here, while it may still be
        there (``hold.undrained`` counts down as they go)."""
        until = time.monotonic() + max(hold.ttl, RETRY_MAX)
        while hold.undrained > 0:
            rid = _request_id()
            try:
                left = await _retrying(
                    functools.partial(self.backend.release, self.namespace, hold.name,
                                      hold.owner, hold.token, rid),
                    until, f"releasing {hold.name!r}, given up, on {self.label}",
                )  # fmt: skip
            except NotHeld:
                left = 0
            hold.undrained = 0 if left == 0 else hold.undrained - 1

    def _undo_soon(self, key: tuple[str, str], undo: Coroutine[Any, Any, None]) -> None:
        """Run ``undo`` in the background (on the loop); an acquire of ``key`` waits for it."""
        task = asyncio.get_running_loop().create_task(quietly(undo))
        with self._guard:
            self._cleanups[key] = task

        def done(_: object) -> None:
            with self._guard:
                if self._cleanups.get(key) is task:
                    del self._cleanups[key]

        task.add_done_callback(done)

    async def _cleaned(self, key: tuple[str, str], end: float | None) -> None:
        """Wait (until ``end`` at most) for the undoing of an earlier hold of ``key``."""
        with self._guard:
            task = self._cleanups.get(key)
        if task is not None:
            timeout = None if end is None else max(0.0, end - time.monotonic())
            await asyncio.wait({task}, timeout=timeout)

    def _record(self, grant: Grant, want: Want, anchor: float) -> HoldState:
        """Record a grant made no earlier than ``anchor`` (new hold, or a re-entry of the
        known one) and watch it."""
        listener = want.listener
        key = (grant.name, grant.owner)
        with self._guard:
            known = self._holds.get(key)
            if known is not None and known.token == grant.token and not known.ended:
                known.count += 1
                known.reentered(want.ttl, anchor, grant.ttl)
                hold = known
            else:
                hold = HoldState(grant.name, grant.owner, want.ttl, grant, anchor)
                hold.renew = want.renew
                self._holds[key] = hold
            if listener is not None and listener not in hold.listeners:
                hold.listeners.append(listener)
        if hold is not known:
            if known is not None and not known.ended:  # the store granted afresh: it had ended
                self._end(known, LockState.LOST, f"the store granted a new token {grant.token}")
            self._watch(hold)
        return hold

    async def release(self, name: str, owner: str, request_id: str | None = None) -> int:
        """Release one count; returns the count left. Ended holds raise their error.

        An ended hold stays known (its state and ``lost`` event readable) until the
        next acquire of that lock replaces it. A release that cannot reach the store
        before the lease runs out ends the hold as lost (renewal has stopped, so the
        store drops it by its ttl) and raises BackendUnavailable.
        """
        self.check_open()
        hold = self.hold(name, owner)
        if hold is not None and hold.ended:
            hold.count = max(0, hold.count - 1)
            hold.reported = True
            raise hold.error()
        if hold is not None and hold.count <= 1:
            await self._stop_renewal(hold)  # renewal stops before the release is sent
        token = hold.token if hold is not None else None
        rid = request_id or _request_id()
        try:
            left = await _retrying(
                lambda: self.backend.release(self.namespace, name, owner, token, rid),
                hold.deadline if hold is not None else time.monotonic() + RETRY_MAX,
                f"releasing {name!r} on {self.label}",
            )
        except NotHeld as exc:
            self._released(hold, exc)
            raise
        except BackendUnavailable as exc:
            if hold is not None and not isinstance(exc, StoreRefused):
                self._end(hold, LockState.LOST, f"the release could not reach the store: {exc}",
                          drain=True)  # fmt: skip
                hold.count, hold.reported = 0, True
            elif hold is not None:  # refused: not released, the watchdog carries on
                hold.releasing = False
                self._watch(hold)
            raise
        self._released(hold, left)
        return left

    def release_now(self, name: str, owner: str) -> int | None:
        """Release the last count from a sync caller's thread, through the direct path.

        None: release through the I/O loop instead (no direct path, a reentrant count,
        an ended hold, or a renewal in flight, which the loop stops first).
        """
        self.check_open()
        direct = self.backend.direct
        hold = self.hold(name, owner)
        if direct is None or hold is None or hold.ended or hold.count != 1:
            return None
        with self._guard:
            if hold.renewer is not None:
                return None
            hold.releasing = True  # from here on the watchdog starts no renewal
        rid = _request_id()
        try:
            left = direct.release(self.namespace, name, owner, hold.token, rid)
        except NotHeld as exc:
            self._released(hold, exc)
            raise
        except BackendUnavailable as exc:
            if isinstance(exc, StoreRefused):  # not released: the watchdog carries on
                hold.releasing = False
                self._watch(hold)
                raise
            return Call(self._rt, self.release(name, owner, rid), finish=True).result()
        except BaseException:  # interrupted: the loop finishes the release
            self._rt.submit(quietly(self.release(name, owner, rid)))
            raise
        self._released(hold, left)
        return left

    def _released(self, hold: HoldState | None, outcome: int | NotHeld) -> None:
        """Record what a release of ``hold`` came to: the count left, or why not held."""
        if hold is None:
            return
        if isinstance(outcome, NotHeld):
            state = LockState.REVOKED if isinstance(outcome, Revoked) else LockState.LOST
            self._end(hold, state, outcome.message)
            hold.count = max(0, hold.count - 1)
            hold.reported = True
            return
        hold.count = max(0, min(hold.count - 1, outcome))  # the store's count may hold others'
        hold.releasing = False
        if hold.count == 0:
            hold.end(LockState.RELEASED, "released")
            self._forget(hold)
            if hold.timer is not None:
                self._on_loop(hold.disarm)
        else:
            self._watch(hold)

    async def extend(self, name: str, owner: str, ttl: float) -> HoldState | None:
        """Make the hold last ``ttl`` seconds from now (and renew with that ttl).

        A renewal in flight is stopped first, so its answer cannot outlive this one's.
        """
        self.check_open()
        hold = self.hold(name, owner)
        if hold is not None and hold.ended:
            hold.reported = True
            raise hold.error()
        if hold is not None:
            await self._stop_renewal(hold)
        sent = time.monotonic()
        try:
            grant = await self.backend.extend(
                self.namespace, name, owner, hold.token if hold else None, ttl
            )
        except NotHeld as exc:
            if hold is not None:
                self._end(hold, LockState.REVOKED if isinstance(exc, Revoked) else LockState.LOST,
                          exc.message)  # fmt: skip
                hold.reported = True
            raise
        except BaseException:
            if hold is not None:
                hold.unheard(sent, ttl)  # maybe applied, maybe not
                self._watch(hold)  # renewal goes on with the hold's ttl
            raise
        if hold is not None:
            hold.extended(sent, ttl, grant.ttl)  # released meanwhile: it stays so
            self._watch(hold)
        return hold

    async def close(self, release: bool = True) -> None:
        """Stop every watchdog; release every hold still had, or leave them to expire."""
        self.closed = True
        for acquiring in list(self._acquiring):  # they end with ClientClosed
            acquiring.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        with self._guard:
            cleanups = list(self._cleanups.values())
        for task in cleanups:  # the store drops what they would undo by its ttl
            task.cancel()
        for hold in self.holds():
            await self._stop_renewal(hold)
            if hold.ended or not release:
                self._forget(hold)
                continue
            for _ in range(max(1, hold.count)):
                try:
                    if (
                        await self.backend.release(
                            self.namespace, hold.name, hold.owner, hold.token
                        )
                        == 0
                    ):
                        break
                except Exception as exc:  # closing goes on; the hold ends at its ttl
                    log.warning("could not release %r on %s at close: %s",
                                hold.name, self.label, exc)  # fmt: skip
                    break
            hold.end(LockState.RELEASED, "released at close")
            self._forget(hold)

    # --- the watchdog -----------------------------------------------------------------

    def _watch(self, hold: HoldState) -> None:
        """Set the timer for the hold's next renewal (or ttl check), unless one is set.

        From a caller's thread the hold is left for the loop's next sweep instead.
        """
        if not self._rt.in_loop():
            self._adopt(hold)
            return
        if hold.ended or hold.releasing or hold.timer is not None:
            return
        if hold.renewer is not None and not hold.renewer.done():
            return  # the renewal in flight sets the next timer
        delay = max(0.0, hold.next_due() - time.monotonic())
        hold.timer = asyncio.get_running_loop().call_later(delay, self._due, hold)

    def _adopt(self, hold: HoldState) -> None:
        """Leave a hold granted in a caller's thread for the loop to watch.

        The loop sweeps the list at ``ttl * ADOPT_FRACTION`` intervals while holds live,
        so a caller wakes the loop only when the sweeps are not yet frequent enough;
        a hold released before the next sweep costs the loop nothing.
        """
        every = hold.ttl * ADOPT_FRACTION
        with self._guard:
            self._unwatched.append(hold)
            if every >= self._sweep_every:
                return
            self._sweep_every = every
        self._rt.loop.call_soon_threadsafe(self._sweep)

    def _sweep(self) -> None:
        """Set the timers of the holds granted in callers' threads (on the loop)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        with self._guard:
            pending, self._unwatched = self._unwatched, []
            if not pending and not self._holds:
                self._sweep_every, self._sweeper = math.inf, None
                return
            every = self._sweep_every
        for hold in pending:
            self._watch(hold)
        self._sweeper = self._rt.loop.call_later(every, self._sweep)

    def _due(self, hold: HoldState) -> None:
        hold.timer = None
        if hold.ended:
            return
        if hold.renew:
            with self._guard:  # against a release starting in a caller's thread
                if hold.releasing:
                    return
                hold.renewer = asyncio.get_running_loop().create_task(self._renewal(hold))
        elif time.monotonic() >= hold.deadline:
            self._end(hold, LockState.LOST, "its ttl ran out (renewal was off)", drain=True)
        else:  # extended meanwhile
            self._watch(hold)

    async def _renewal(self, hold: HoldState) -> None:
        me = asyncio.current_task()
        await self._renew(hold)
        # Stopping sets ``hold.renewer`` to None before cancelling, so even a cancellation
        # lost inside an awaited call cannot set another timer.
        if hold.renewer is me:
            hold.renewer = None
            self._watch(hold)

    async def _renew(self, hold: HoldState) -> None:
        """Extend the hold until one attempt succeeds or its deadline passes.

        ``at_risk`` comes with the first attempt that fails or is slow to answer (see
        SLOW_FRACTION); an attempt not answered within ttl/3 is sent again.
        """
        backoff = RETRY_FIRST
        loop = asyncio.get_running_loop()
        while not hold.ended:
            sent = time.monotonic()
            left = hold.deadline - sent
            if left <= 0:
                self._end(hold, LockState.LOST, "renewal kept failing until the lease ran out",
                          drain=True)  # fmt: skip
                return
            slow = loop.call_later(hold.slow_mark(sent), self._at_risk, hold,
                                   "renewal is not answered")  # fmt: skip
            try:
                # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation
                async with asyncio.timeout(hold.attempt_window(sent)):
                    grant = await self.backend.extend(
                        self.namespace, hold.name, hold.owner, hold.token, hold.ttl
                    )
            except Revoked as exc:
                self._end(hold, LockState.REVOKED, exc.message)
                return
            except NotHeld as exc:
                self._end(hold, LockState.LOST, exc.message)
                return
            except Exception as exc:  # any other failure is worth retrying until the deadline
                self._at_risk(hold, f"renewal failed: {exc!r}")
                await asyncio.sleep(hold.retry_pause(backoff, time.monotonic()))
                backoff = hold.next_backoff(backoff)
                continue
            finally:
                slow.cancel()
            if hold.renewed(sent, grant.ttl):
                log.info("renewing %r on %s recovered", hold.name, self.label)
            return

    def _at_risk(self, hold: HoldState, why: str) -> None:
        if hold.at_risk():
            log.warning("lock %r on %s is at risk, retrying: %s", hold.name, self.label, why)

    async def _stop_renewal(self, hold: HoldState) -> None:
        hold.disarm()
        task, hold.renewer = hold.renewer, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _end(self, hold: HoldState, state: LockState, reason: str, drain: bool = False) -> None:
        """Mark the hold lost or revoked, tell its listeners, stop its watchdog.

        ``drain``: the hold ends by this side's reckoning, not the store's word, so it is
        also released at the store while it may still be there (the same owner's next
        acquire must never re-enter it).
        """
        if not hold.end(state, reason):
            return
        log.warning("lock %r on %s (owner %s, token %d) %s: %s",
                    hold.name, self.label, hold.owner, hold.token, state.value, reason)  # fmt: skip
        if drain:
            hold.undrained = hold.count
            self._on_loop(self._undo_soon, (hold.name, hold.owner), self._drain(hold))
        for listener in hold.listeners:
            try:
                listener(hold)
            except Exception:
                log.exception("on_lost listener of %r failed", hold.name)
        self._on_loop(self._unwatch, hold)

    def _unwatch(self, hold: HoldState) -> None:
        hold.disarm()
        if hold.renewer is not None and hold.renewer is not asyncio.current_task():
            hold.renewer.cancel()

    def _on_loop(self, func: Callable[..., object], *args: Any) -> None:
        """Call ``func(*args)`` now if on the loop, else soon on it (loop-only state)."""
        if self._rt.in_loop():
            func(*args)
        else:
            self._rt.loop.call_soon_threadsafe(func, *args)

    def _forget(self, hold: HoldState) -> None:
        with self._guard:
            if self._holds.get((hold.name, hold.owner)) is hold:
                del self._holds[(hold.name, hold.owner)]


def _granted_at(first: float, sent: float, grant: Grant) -> float:
    """The earliest moment the store can have granted ``grant``: answering the attempt
    sent at ``sent`` of an acquire first sent at ``first``.

    A store that keeps a waiter across calls (redis) counts ``waited`` from the first
    call's arrival, not the retry's, so it is added to ``first``; and no answer to this
    attempt starts its lease before the attempt was sent.
    """
    return max(sent, first + grant.waited * (1 - DRIFT))


def _lease_end(anchor: float, grant: Grant) -> float:
    """The local deadline of ``grant``, made no earlier than ``anchor``."""
    return anchor + grant.ttl * (1 - DRIFT)


async def _retrying(op: Callable[[], Awaitable[T]], deadline: float | None, what: str) -> T:
    """Run ``op`` again (it keeps its request id) while the store is unreachable.

    Gives up with the last BackendUnavailable at ``deadline`` (None: never). ``what``
    names the operation, the lock and the store in log lines.
    """
    backoff = RETRY_FIRST
    while True:
        try:
            return await op()
        except BackendUnavailable as exc:
            if isinstance(exc, StoreRefused):
                raise  # credentials or permissions: asking again cannot help
            if deadline is not None and time.monotonic() + backoff > deadline:
                raise
            log.warning("%s: store unreachable (%s); retrying in %.2f s", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX)
