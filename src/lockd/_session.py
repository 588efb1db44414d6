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
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from lockd.backends import Backend
from lockd.errors import BackendUnavailable, LockLost, NotHeld, Revoked, StoreRefused
from lockd.model import Grant, LockState

__all__ = ["HoldState", "Session"]

log = logging.getLogger("lockd")

RENEW_FRACTION = 1 / 3
"""Renew when this fraction of the ttl has passed."""
DRIFT = 0.01
"""Fraction of a duration by which the store's clock may run differently from ours."""
RETRY_FIRST = 0.05
RETRY_MAX = 1.0

T = TypeVar("T")
Listener = Callable[["HoldState"], None]
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
    """Acquire, extend and release through one backend, and keep the holds alive."""

    def __init__(self, backend: Backend, namespace: str) -> None:
        self.backend = backend
        self.namespace = namespace
        self._holds: dict[tuple[str, str], HoldState] = {}
        self._guard = threading.Lock()  # the dict is read from callers' threads

    def hold(self, name: str, owner: str) -> HoldState | None:
        """The current hold state of (name, owner), if this session knows one."""
        with self._guard:
            return self._holds.get((name, owner))

    def holds(self) -> list[HoldState]:
        """Every hold this session knows."""
        with self._guard:
            return list(self._holds.values())

    async def acquire(
        self,
        name: str,
        owner: str,
        *,
        ttl: float,
        wait: float | None,
        limit: int,
        renew: bool,
        listener: Listener | None,
    ) -> HoldState:
        """Acquire (or re-enter) and start the watchdog.

        A request the store may have applied without our hearing (BackendUnavailable)
        is retried with the same request id, so it is applied once.
        """
        known = self.hold(name, owner)
        if known is not None and known.ended and known.count > 0:
            raise known.error()  # nested code must not go on as if it still held
        sent = time.monotonic()
        rid = _request_id()

        def attempt() -> Awaitable[Grant]:
            left = None if wait is None else max(0.0, sent + wait - time.monotonic())
            return self.backend.acquire(self.namespace, name, owner, ttl=ttl, wait=left,
                                        limit=limit, request_id=rid)  # fmt: skip

        grant = await _retrying(attempt, None if wait is None else sent + max(wait, RETRY_MAX))
        # No await below: a cancellation must not land between the grant and its record.
        anchor = sent + grant.waited * (1 - DRIFT)
        if known is not None and known.token == grant.token and not known.ended:
            known.count = grant.count
            known.ttl = ttl
            known.lease(anchor, grant.ttl)
            hold = known
        else:
            if known is not None:  # the store granted afresh, so the earlier hold had ended
                self._end(known, LockState.LOST, f"the store granted a new token {grant.token}")
            hold = HoldState(name, owner, ttl, grant, anchor)
            hold.renew = renew
            with self._guard:
                self._holds[(name, owner)] = hold
            self._watch(hold)
        if listener is not None and listener not in hold.listeners:
            hold.listeners.append(listener)
        return hold

    async def release(self, name: str, owner: str) -> int:
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
        rid = _request_id()
        try:
            left = await _retrying(
                lambda: self.backend.release(self.namespace, name, owner, token, rid),
                hold.deadline if hold is not None else time.monotonic() + RETRY_MAX,
            )
        except NotHeld as exc:
            if hold is not None:
                self._end(hold, LockState.REVOKED if isinstance(exc, Revoked) else LockState.LOST,
                          exc.message)  # fmt: skip
                hold.count = max(0, hold.count - 1)
            raise
        if hold is not None:
            hold.count = left
            if left == 0:
                hold.state = LockState.RELEASED
                self._forget(hold)
            else:
                self._watch(hold)
        return left

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
        """Set the timer for the hold's next renewal (or ttl check), unless one is set."""
        if hold.ended or hold.timer is not None:
            return
        if hold.renewer is not None and not hold.renewer.done():
            return  # the renewal in flight sets the next timer
        due = hold.renew_at if hold.renew else hold.deadline
        delay = max(0.0, due - time.monotonic())
        hold.timer = asyncio.get_running_loop().call_later(delay, self._due, hold)

    def _due(self, hold: HoldState) -> None:
        hold.timer = None
        if hold.ended:
            return
        if hold.renew:
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
        hold.disarm()
        if hold.renewer is not None and hold.renewer is not asyncio.current_task():
            hold.renewer.cancel()

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
