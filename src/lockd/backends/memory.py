"""The in-process store (``memory://``), and the machinery the file store reuses.

The :class:`~lockd._core.LockTable` decides; this module makes its decisions durable
(through ``_persist``) and delivers them with asyncio futures.

Every operation is one *step*: a synchronous call into the table, whose changes and
handoffs are captured at once; ``_persist(changes, on_durable)`` calls back when they
are durable, and only then are the handoffs delivered (by that callback, so it happens
even if the caller is cancelled) and the caller answered. A step that changed nothing
still read what earlier steps changed: while any of that is not yet durable, its answer
waits for it too (``_persist(None, ...)``), so no answer ever rests on state a failed
write could lose. A caller that leaves before that gives back what the step granted it.
The memory store persists nothing and skips all that; the file store batches the
changes of every step waiting on it into one transaction.

A waiter whose wait ends is taken out of the queue by a step; if a step had already
granted it (a grant still being written), the grant wins and the caller gets it once
it is durable, so a retry with the same request id and the original agree.

A blocked acquire waits on its own future, which a release, expiry or force-release
resolves directly (a *handoff*), so waiters wake without polling. A timer per waited-on
resource fires at its earliest hold expiry; a slow sweep drops idle expired holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import TypeVar, cast

from lockd._core import RETENTION, Changes, Key, LockTable, Outcome, Waiter
from lockd.backends.base import AcquireRequest, Backend
from lockd.errors import AcquireTimeout, BackendUnavailable, NotHeld
from lockd.model import Capabilities, Grant, HolderInfo, KeepaliveAnswer, ResourceInfo, SafetyLevel

__all__ = ["LocalBackend", "MemoryBackend"]

T = TypeVar("T")
Clock = Callable[[], float]
Wake = asyncio.Future[Grant]
Handoff = tuple[Waiter[Wake], Outcome]
Step = Callable[[], tuple[T, list[Handoff]]]
SWEEP_INTERVAL = 1.0
"""Seconds between sweeps of expired holds that nobody waits on."""


class LocalBackend(Backend):
    """A lock table served in this process's event loop."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        retention: float = RETENTION,
    ) -> None:
        self.url = url
        self._clock = clock
        self._wall = wall
        self._table: LockTable[Wake] = LockTable(retention)
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BackendUnavailable | None = None

    _persistent = False
    """Whether ``_persist`` must run before anyone hears of a change."""

    # --- the contract -----------------------------------------------------------------

    async def _acquire(self, req: AcquireRequest) -> Grant:
        namespace, name, owner, ttl, wait = req.namespace, req.name, req.owner, req.ttl, req.wait
        limit, request_id, session = req.limit, req.request_id, req.session
        self._check()
        self._start()
        key = (namespace, name)

        def step() -> tuple[Grant | Waiter[Wake] | None, list[Handoff]]:
            now = self._clock()
            grant = self._table.acquire(key, owner, ttl, limit, now, self._wall(), request_id,
                                        session)  # fmt: skip
            if grant is not None or wait == 0:
                return grant, []
            # Queue in the same step as the denial: no release can slip in between.
            waiter = Waiter(key, owner, ttl, now, self._loop().create_future(), request_id,
                            self._wall(), session=self._table.session(session, ttl, now)
                            if session is not None else None)  # fmt: skip
            replaced = self._table.enqueue(waiter)
            if replaced is not None and not replaced.wake.done():
                replaced.wake.set_exception(self._timeout(key, owner, "replaced by a retry"))
            return waiter, []

        outcome = await self._durably(key, step, undo=lambda got: self._undo_acquire(key, got))
        if isinstance(outcome, Grant):
            return outcome
        if outcome is None:
            raise self._timeout(key, owner)
        waiter = outcome
        try:
            try:
                async with asyncio.timeout(wait):
                    return await asyncio.shield(waiter.wake)
            except TimeoutError:
                if waiter.wake.done():  # granted, or failed, at the very end of the wait
                    return waiter.wake.result()
                if self._leave_queue(waiter):
                    raise self._timeout(key, owner) from None
            # A step granted it before the wait ended: the grant wins, once durable.
            return await asyncio.shield(waiter.wake)
        except asyncio.CancelledError:
            self._undo_acquire(key, waiter)
            raise

    async def _release(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        request_id: str | None,
        session: str | None,
    ) -> int:
        self._check()
        key = (namespace, name)
        return await self._durably(
            key,
            lambda: self._table.release(key, owner, token, self._clock(), request_id, session),
        )

    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        self._check()
        key = (namespace, name)

        def step() -> tuple[None, list[Handoff]]:
            waiter, handoffs = self._table.abandon(key, owner, request_id, self._clock())
            if waiter is not None and not waiter.wake.done():
                waiter.wake.set_exception(self._timeout(key, owner, "abandoned by its caller"))
            return None, handoffs

        await self._durably(key, step)

    async def _extend(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        ttl: float,
        session: str | None,
    ) -> Grant:
        self._check()
        key = (namespace, name)
        return await self._durably(
            key, lambda: (self._table.extend(key, owner, token, ttl, self._clock(), session), [])
        )

    async def _open_session(self, ttl: float) -> str:
        self._check()
        self._start()
        session_id = secrets.token_hex(12)
        await self._durably(
            None, lambda: (self._table.open_session(session_id, ttl, self._clock()), [])
        )
        return session_id

    async def _keepalive(self, session_ids: list[str]) -> list[KeepaliveAnswer | None]:
        self._check()
        return await self._durably(
            None, lambda: (self._table.keepalive(session_ids, self._clock()), [])
        )

    async def _revoke_session(self, session_id: str) -> None:
        self._check()
        await self._durably(
            None, lambda: (None, self._table.revoke_session(session_id, self._clock()))
        )

    async def _inspect(self, namespace: str, name: str) -> ResourceInfo:
        self._check()
        key = (namespace, name)
        return await self._durably(
            key, lambda: (self._table.inspect(key, self._clock(), self._wall()), [])
        )

    async def _list_locks(self, namespace: str, prefix: str) -> list[ResourceInfo]:
        self._check()

        def step() -> tuple[list[ResourceInfo], list[Handoff]]:
            now, wall = self._clock(), self._wall()
            names = self._table.names(namespace, prefix, now)
            return [self._table.inspect((namespace, name), now, wall) for name in names], []

        return await self._durably(None, step)

    async def _force_release(
        self, namespace: str, name: str, owner: str | None
    ) -> list[HolderInfo]:
        self._check()
        key = (namespace, name)

        def step() -> tuple[list[HolderInfo], list[Handoff]]:
            now = self._clock()
            before = self._table.inspect(key, now, self._wall())
            evicted, handoffs = self._table.force_release(key, owner, now)
            tokens = {hold.token for hold in evicted}
            return [h for h in before.holders if h.token in tokens], handoffs

        return await self._durably(key, step)

    async def aclose(self) -> None:
        """Stop the sweep and the timers."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # --- steps ------------------------------------------------------------------------

    async def _durably(
        self, key: Key | None, step: Step[T], undo: Callable[[T], None] | None = None
    ) -> T:
        """Run ``step`` now and return its result once its changes are durable.

        A caller cancelled while the changes are written gets nothing: ``undo`` gives
        back what the step granted it.
        """
        outcome, error, handoffs, changes = self._take_step(step)
        result = cast("T", outcome)  # a step that did not raise returned a result
        if changes is None and not self._unwritten():
            self._announce(key, handoffs)
        else:
            durable: asyncio.Future[BackendUnavailable | None] = self._loop().create_future()

            def on_durable(failure: BackendUnavailable | None) -> None:
                self._settled(key, handoffs, failure)
                if not durable.done():
                    durable.set_result(failure)
                elif failure is None and error is None and undo is not None:
                    undo(result)  # the caller was cancelled meanwhile

            self._persist(changes, on_durable)
            failure = await durable
            if failure is not None:
                raise failure
        if error is not None:
            raise error
        return result

    def _run_step(self, key: Key | None, step: Step[object]) -> None:
        """Run ``step`` for nobody in particular; its handoffs go out once it is durable."""
        _, _, handoffs, changes = self._take_step(step)
        if changes is None and not self._unwritten():
            self._announce(key, handoffs)
        else:
            self._persist(changes, lambda failure: self._settled(key, handoffs, failure))

    def _take_step(
        self, step: Step[T]
    ) -> tuple[T | None, Exception | None, list[Handoff], Changes | None]:
        """Run ``step`` synchronously (so it is atomic).

        Returns its result or error, its handoffs, and the changes to persist before
        anyone hears of them (None when there are none).
        """
        result: T | None = None
        error: Exception | None = None
        handoffs: list[Handoff] = []
        try:
            result, handoffs = step()
        except Exception as exc:  # the step's own error; its other changes still count
            error = exc
        # Captured now: another step's changes are not ours to announce.
        handoffs = [*handoffs, *self._table.take_handoffs()]
        if not self._persistent:
            self._table.drop_changes()
            return result, error, handoffs, None
        changes = self._table.take_changes()
        return result, error, handoffs, changes if changes else None

    def _announce(self, key: Key | None, handoffs: list[Handoff]) -> None:
        self._deliver(handoffs)
        if key is not None:
            self._arm_timer(key)

    def _settled(
        self, key: Key | None, handoffs: list[Handoff], failure: BackendUnavailable | None
    ) -> None:
        """Deliver a step's handoffs once it is durable, or fail them with the store."""
        if failure is None:
            self._announce(key, handoffs)
            return
        for waiter, _ in handoffs:
            if not waiter.wake.done():
                waiter.wake.set_exception(failure)

    def _unwritten(self) -> bool:
        """Whether changes of earlier steps are not durable yet."""
        return False

    def _persist(
        self, changes: Changes | None, on_durable: Callable[[BackendUnavailable | None], None]
    ) -> None:
        """Start making ``changes`` durable; call ``on_durable`` (in the event loop) once
        they are, and every change queued before them, with None, or with the failure
        that took the store out of service. ``None``: nothing new, wait for the earlier.
        """
        raise NotImplementedError

    def _check(self) -> None:
        if self._failure is not None:
            raise BackendUnavailable(f"{self.url} is out of service: {self._failure.message}")
        if self._closed:
            raise BackendUnavailable(f"{self.url} is closed")

    def _undo_acquire(self, key: Key, outcome: Grant | Waiter[Wake] | None) -> None:
        """Give back what an acquire got for a caller that left."""
        if isinstance(outcome, Waiter):
            if self._leave_queue(outcome) or outcome.grant is None:
                return
            # Granted by a step (delivered or not): given back in a step of its own,
            # after it in the table, so it is written after the grant.
            if not outcome.wake.done():
                outcome.wake.cancel()  # its delivery then finds nobody to tell
            self._give_back(key, outcome.grant)
        elif outcome is not None:
            self._give_back(key, outcome)

    def _leave_queue(self, waiter: Waiter[Wake]) -> bool:
        """Take a waiter that gave up out of the queue now, if it is still queued
        (not granted by a step); returns whether it was."""
        if not self._table.is_queued(waiter):
            return False
        waiter.wake.cancel()
        self._run_step(waiter.key, lambda: (None, self._table.dequeue(waiter, self._clock())))
        return True

    # --- waking waiters ---------------------------------------------------------------

    def _deliver(self, handoffs: list[Handoff]) -> None:
        for waiter, outcome in handoffs:
            if waiter.wake.done():  # its caller left (and gave the grant back)
                pass
            elif isinstance(outcome, Grant):
                waiter.wake.set_result(outcome)
            else:
                waiter.wake.set_exception(outcome)
            self._arm_timer(waiter.key)

    def _give_back(self, key: Key, grant: Grant) -> None:
        def step() -> tuple[None, list[Handoff]]:
            try:
                return None, self._table.release(key, grant.owner, grant.token, self._clock())[1]
            except NotHeld:
                return None, []  # it ended meanwhile: nothing to give back

        self._run_step(key, step)

    def _out_of_service(self, error: BackendUnavailable) -> None:
        """Refuse everything from now on: memory is ahead of the disk, so don't guess."""
        self._failure = error
        for key in self._table.waiting_keys():
            for waiter in self._table.waiters_of(key):
                if not waiter.wake.done():
                    waiter.wake.set_exception(error)

    def _arm_timer(self, key: Key) -> None:
        """Wake the queue of ``key`` when its earliest hold expires."""
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        due = self._table.next_expiry(key)
        if due is None or self._closed:
            return
        delay = max(0.0, due - self._clock())
        self._timers[key] = self._loop().call_later(delay, self._expire_now, key)

    def _expire_now(self, key: Key) -> None:
        self._timers.pop(key, None)
        self._run_step(key, lambda: (None, self._table.expire(self._clock(), key)))

    def _start(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = self._loop().create_task(self._sweep())

    async def sweep(self) -> None:
        """Drop expired holds, prune idle names and old request ids (done every second)."""
        self._check()
        await self._durably(None, lambda: (None, self._table.expire(self._clock())))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            with contextlib.suppress(BackendUnavailable):
                await self.sweep()
            for key in self._table.waiting_keys():
                if key not in self._timers:
                    self._arm_timer(key)

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _timeout(self, key: Key, owner: str, why: str = "") -> AcquireTimeout:
        live = self._table.live_holders(key, self._clock())
        holders = ", ".join(f"{o} (token {t})" for o, t in live) or "nobody"
        detail = f"; {why}" if why else ""
        return AcquireTimeout(
            f"{key[1]!r} was not granted in time; held by {holders}{detail}",
            name=key[1],
            owner=owner,
        )


class MemoryBackend(LocalBackend):
    """Locks in this process's memory: for tests and for embedding. Keeps nothing on exit."""

    capabilities = Capabilities(
        safety=SafetyLevel.SINGLE_NODE,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=False,
        sessions=True,
    )
