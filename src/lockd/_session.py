"""A client's holds and their watchdog. Everything here runs on the I/O loop.

Theory of operation. Each (name, owner) this client holds has one :class:`HoldState`:
its token, reentrant count, state and a *local deadline*: the latest moment, on this
process's ``time.monotonic()``, by which the store is sure to still count the hold.
The deadline is measured from before the request that set it was sent (plus the time
the store says the request waited in its queue), less a drift margin, so the SDK never
believes in a hold the store has already dropped. No wall clock is used.

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
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lockd._runtime import Call, Runtime, quietly
from lockd.backends import Backend
from lockd.backends.base import AcquireRequest, ContinueOnLoop
from lockd.errors import BackendUnavailable, LockLost, NotHeld, Revoked, StoreRefused
from lockd.model import Grant, LockState

__all__ = ["HoldState", "Session"]

log = logging.getLogger("lockd")

RENEW_FRACTION = 1 / 3
"""Renew when this fraction of the ttl has passed."""
DRIFT = 0.01
"""Fraction of a duration by which the store's clock may run differently from ours."""
ADOPT_FRACTION = 1 / 6
"""Holds granted in a caller's thread get their renewal timer within this fraction of
their ttl (well before a renewal is due at RENEW_FRACTION)."""
RETRY_FIRST = 0.05
RETRY_MAX = 1.0

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


_ENDED = (LockState.LOST, LockState.REVOKED, LockState.RELEASED)
_LOSSES = (LockState.LOST, LockState.REVOKED)
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


class HoldState:
    """The SDK's view of one owner's hold on one name (readable from any thread)."""

    def __init__(self, name: str, owner: str, ttl: float, grant: Grant, anchor: float) -> None:
        self.name = name
        self.owner = owner
        self.ttl = ttl
        self.token = grant.token
        self.count = grant.count
        self.state = LockState.HELD
        self.reason = ""
        self._lost: threading.Event | None = None
        self.listeners: list[Listener] = []
        self.renew = True
        self.timer: asyncio.TimerHandle | None = None
        """Starts the next renewal (or, with renewal off, the ttl check)."""
        self.renewer: asyncio.Task[None] | None = None
        """The renewal in flight, if any."""
        self.releasing = False
        """A release is on its way from a caller's thread: start no renewal."""
        self.deadline = 0.0
        self.renew_at = 0.0
        self.lease(anchor, grant.ttl)

    def lease(self, anchor: float, ttl_left: float) -> None:
        """Record that the store granted ``ttl_left`` seconds as of ``anchor``."""
        self.deadline = max(self.deadline, anchor + ttl_left * (1 - DRIFT))
        self.renew_at = anchor + self.ttl * RENEW_FRACTION

    @property
    def lost(self) -> threading.Event:
        """Set once the hold is lost or revoked (made on first use: most holds never ask)."""
        with _lost_guard:
            if self._lost is None:
                self._lost = threading.Event()
                if self.state in _LOSSES:
                    self._lost.set()
            return self._lost

    def lose(self, state: LockState, reason: str) -> None:
        """Record that the hold was lost or revoked, and set ``lost``."""
        self.reason = reason
        with _lost_guard:
            self.state = state
            lost = self._lost
        if lost is not None:
            lost.set()

    def disarm(self) -> None:
        """Cancel the timer of the next renewal (or ttl check), if set."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def ended(self) -> bool:
        """True once lost, revoked or released."""
        return self.state in _ENDED

    def error(self) -> NotHeld:
        """The error the next operation on an ended hold raises."""
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

    def __init__(self, backend: Backend, namespace: str, rt: Runtime) -> None:
        self.backend = backend
        self.namespace = namespace
        self._rt = rt
        self._holds: dict[tuple[str, str], HoldState] = {}
        self._guard = threading.Lock()  # the fields below, shared by callers and the loop
        self._unwatched: list[HoldState] = []
        """Holds granted in callers' threads, waiting for the loop to set their timers."""
        self._sweep_every = math.inf
        """Seconds between the loop's looks at ``_unwatched`` (inf: not looking)."""
        self._sweeper: asyncio.TimerHandle | None = None

    def hold(self, name: str, owner: str) -> HoldState | None:
        """The current hold state of (name, owner), if this session knows one."""
        with self._guard:
            return self._holds.get((name, owner))

    def holds(self) -> list[HoldState]:
        """Every hold this session knows."""
        with self._guard:
            return list(self._holds.values())

    async def acquire(
        self, want: Want, request_id: str | None = None, sent: float | None = None
    ) -> HoldState:
        """Acquire (or re-enter) and start the watchdog.

        A request the store may have applied without our hearing (BackendUnavailable)
        is retried with the same request id, so it is applied once. ``request_id`` and
        ``sent`` continue an acquire begun in a caller's thread.
        """
        known = self.hold(want.name, want.owner)
        if known is not None and known.ended and known.count > 0:
            raise known.error()  # nested code must not go on as if it still held
        start = time.monotonic() if sent is None else sent
        rid = request_id or _request_id()
        wait = want.wait

        def attempt() -> Awaitable[Grant]:
            left = None if wait is None else max(0.0, start + wait - time.monotonic())
            return self.backend.acquire(self.namespace, want.name, want.owner, ttl=want.ttl,
                                        wait=left, limit=want.limit, request_id=rid)  # fmt: skip

        grant = await _retrying(attempt, None if wait is None else start + max(wait, RETRY_MAX))
        # No await below: a cancellation must not land between the grant and its record.
        return self._record(grant, want, start)

    def acquire_now(self, want: Want) -> HoldState | None:
        """Acquire from a sync caller's thread through the backend's direct path.

        None: make this acquire through the I/O loop instead (no direct path, or a
        re-entry, whose record the loop updates).
        """
        direct = self.backend.direct
        if direct is None:
            return None
        name, owner = want.name, want.owner
        known = self.hold(name, owner)
        if known is not None:
            if not known.ended:
                return None
            if known.count > 0:
                raise known.error()
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
            except Exception:
                raise
            except BaseException:  # interrupted, maybe before the loop took the request up
                self._abandon_soon(name, owner, rid)
                raise
        except BaseException:  # interrupted: the store may have applied it, so undo it
            self._abandon_soon(name, owner, rid)
            raise
        return self._record(grant, want, sent)

    def _abandon_soon(self, name: str, owner: str, rid: str) -> None:
        """Have the loop undo acquire ``rid``, whatever the store made of it."""
        self._rt.submit(quietly(self.backend.abandon(self.namespace, name, owner, rid)))

    def _record(self, grant: Grant, want: Want, sent: float) -> HoldState:
        """Record a grant (new hold, or a re-entry of the known one) and watch it."""
        ttl, listener = want.ttl, want.listener
        anchor = sent + grant.waited * (1 - DRIFT)
        key = (grant.name, grant.owner)
        with self._guard:
            known = self._holds.get(key)
            if known is not None and known.token == grant.token and not known.ended:
                known.count = grant.count
                known.ttl = ttl
                known.lease(anchor, grant.ttl)
                hold = known
            else:
                hold = HoldState(grant.name, grant.owner, ttl, grant, anchor)
                hold.renew = want.renew
                self._holds[key] = hold
            if listener is not None and listener not in hold.listeners:
                hold.listeners.append(listener)
        if hold is not known:
            if known is not None:  # the store granted afresh, so the earlier hold had ended
                self._end(known, LockState.LOST, f"the store granted a new token {grant.token}")
            self._watch(hold)
        return hold

    async def release(self, name: str, owner: str, request_id: str | None = None) -> int:
        """Release one count; returns the count left. Ended holds raise their error.

        An ended hold stays known (its state and ``lost`` event readable) until the
        next acquire of that lock replaces it.
        """
        hold = self.hold(name, owner)
        if hold is not None and hold.ended:
            hold.count = max(0, hold.count - 1)
            raise hold.error()
        if hold is not None and hold.count <= 1:
            await self._stop_renewal(hold)  # renewal stops before the release is sent
        token = hold.token if hold is not None else None
        rid = request_id or _request_id()
        try:
            left = await _retrying(
                lambda: self.backend.release(self.namespace, name, owner, token, rid),
                hold.deadline if hold is not None else time.monotonic() + RETRY_MAX,
            )
        except NotHeld as exc:
            self._released(hold, exc)
            raise
        self._released(hold, left)
        return left

    def release_now(self, name: str, owner: str) -> int | None:
        """Release the last count from a sync caller's thread, through the direct path.

        None: release through the I/O loop instead (no direct path, a reentrant count,
        an ended hold, or a renewal in flight, which the loop stops first).
        """
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
            return
        hold.count = outcome
        hold.releasing = False
        if outcome == 0:
            hold.state = LockState.RELEASED
            self._forget(hold)
            if hold.timer is not None:
                self._on_loop(hold.disarm)
        else:
            self._watch(hold)

    async def extend(self, name: str, owner: str, ttl: float) -> HoldState | None:
        """Make the hold last ``ttl`` seconds from now (and renew with that ttl)."""
        hold = self.hold(name, owner)
        if hold is not None and hold.ended:
            raise hold.error()
        sent = time.monotonic()
        try:
            grant = await self.backend.extend(
                self.namespace, name, owner, hold.token if hold else None, ttl
            )
        except NotHeld as exc:
            if hold is not None:
                self._end(hold, LockState.REVOKED if isinstance(exc, Revoked) else LockState.LOST,
                          exc.message)  # fmt: skip
            raise
        if hold is not None:
            hold.ttl = ttl
            hold.deadline = 0.0
            hold.lease(sent, grant.ttl)
            hold.state = LockState.HELD
            if hold.timer is not None:  # the next renewal is due at another time now
                hold.disarm()
                self._watch(hold)
        return hold

    async def close(self, release: bool = True) -> None:
        """Stop every watchdog; release every hold still had, or leave them to expire."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
                    log.warning("could not release %r on close: %s", hold.name, exc)
                    break
            hold.state = LockState.RELEASED
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
        due = hold.renew_at if hold.renew else hold.deadline
        delay = max(0.0, due - time.monotonic())
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
            self._end(hold, LockState.LOST, "its ttl ran out (renewal was off)")
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
        backoff = RETRY_FIRST
        while not hold.ended:
            sent = time.monotonic()
            left = hold.deadline - sent
            if left <= 0:
                self._end(hold, LockState.LOST, "renewal kept failing until the lease ran out")
                return
            try:
                # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation
                async with asyncio.timeout(left):
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
                if hold.state is LockState.HELD:
                    hold.state = LockState.AT_RISK
                    log.warning("renewing %r failed, retrying: %s", hold.name, exc)
                await asyncio.sleep(min(backoff, max(0.0, hold.deadline - time.monotonic())))
                backoff = min(backoff * 2, max(RETRY_FIRST, hold.ttl / 6), RETRY_MAX)
                continue
            hold.lease(sent, grant.ttl)
            if hold.state is LockState.AT_RISK:
                log.info("renewing %r recovered", hold.name)
                hold.state = LockState.HELD
            return

    async def _stop_renewal(self, hold: HoldState) -> None:
        hold.disarm()
        task, hold.renewer = hold.renewer, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _end(self, hold: HoldState, state: LockState, reason: str) -> None:
        """Mark the hold lost or revoked, tell its listeners, stop its watchdog."""
        if hold.ended:
            return
        hold.lose(state, reason)
        log.warning("lock %r (owner %s, token %d) %s: %s",
                    hold.name, hold.owner, hold.token, state.value, reason)  # fmt: skip
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


async def _retrying(op: Callable[[], Awaitable[T]], deadline: float | None) -> T:
    """Run ``op`` again (it keeps its request id) while the store is unreachable.

    Gives up with the last BackendUnavailable at ``deadline`` (None: never).
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
            log.warning("store unreachable; retrying in %.2f s", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX)
