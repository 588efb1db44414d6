"""The in-process store (``memory://``), and the waiting machinery the file store reuses.

The :class:`~lockd._core.LockTable` decides; this module delivers its decisions with
asyncio futures. A blocked acquire waits on its own future, which a release, expiry or
force-release resolves directly (a *handoff*), so waiters wake without polling. A timer
per waited-on resource fires at its earliest hold expiry; a slow sweep drops idle
expired holds. ``_persist`` is called with every change before any caller is answered:
the memory store keeps nothing, the file store writes it to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from lockd._core import Changes, Key, LockTable, Waiter
from lockd.backends.base import Backend
from lockd.errors import AcquireTimeout, BackendUnavailable, NotHeld
from lockd.model import Capabilities, Grant, HolderInfo, ResourceInfo, SafetyLevel

__all__ = ["LocalBackend", "MemoryBackend"]

Clock = Callable[[], float]
Handoff = tuple[Waiter[asyncio.Future[Grant]], Grant]
SWEEP_INTERVAL = 1.0
"""Seconds between sweeps of expired holds that nobody waits on."""


class LocalBackend(Backend):
    """A lock table served in this process's event loop."""

    def __init__(self, url: str, *, clock: Clock = time.monotonic, wall: Clock = time.time) -> None:
        self.url = url
        self._clock = clock
        self._wall = wall
        self._table: LockTable[asyncio.Future[Grant]] = LockTable()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BackendUnavailable | None = None

    # --- the contract -----------------------------------------------------------------

    async def _acquire(
        self,
        namespace: str,
        name: str,
        owner: str,
        *,
        ttl: float,
        wait: float | None,
        limit: int,
        request_id: str | None,
    ) -> Grant:
        self._check()
        self._start()
        key = (namespace, name)
        now = self._clock()
        try:
            grant = self._table.acquire(key, owner, ttl, limit, now, self._wall(), request_id)
        finally:
            self._after(key)
        if grant is not None:
            return grant
        if wait == 0:
            raise self._timeout(key, owner)
        loop = asyncio.get_running_loop()
        waiter: Waiter[asyncio.Future[Grant]] = Waiter(
            key, owner, ttl, now, loop.create_future(), request_id, self._wall()
        )
        replaced = self._table.enqueue(waiter)
        if replaced is not None and not replaced.wake.done():
            replaced.wake.set_exception(self._timeout(key, owner, "replaced by a retry"))
        self._arm_timer(key)
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(waiter.wake)
        except TimeoutError:
            if _granted(waiter.wake):
                return waiter.wake.result()
            self._leave(waiter)
            raise self._timeout(key, owner) from None
        except asyncio.CancelledError:
            if _granted(waiter.wake):
                self._give_back(key, waiter.wake.result())
            else:
                self._leave(waiter)
            raise

    async def _release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
    ) -> int:
        self._check()
        key = (namespace, name)
        handoffs: list[Handoff] = []
        try:
            left, handoffs = self._table.release(key, owner, token, self._clock(), request_id)
        finally:
            self._after(key, handoffs)
        return left

    async def _extend(
        self, namespace: str, name: str, owner: str, token: int | None, ttl: float
    ) -> Grant:
        self._check()
        key = (namespace, name)
        try:
            return self._table.extend(key, owner, token, ttl, self._clock())
        finally:
            self._after(key)

    async def _inspect(self, namespace: str, name: str) -> ResourceInfo:
        self._check()
        key = (namespace, name)
        try:
            return self._table.inspect(key, self._clock(), self._wall())
        finally:
            self._after(key)

    async def _list_locks(self, namespace: str, prefix: str) -> list[ResourceInfo]:
        self._check()
        now, wall = self._clock(), self._wall()
        try:
            return [
                self._table.inspect((namespace, name), now, wall)
                for name in self._table.names(namespace, prefix, now)
            ]
        finally:
            self._after(None)

    async def _force_release(
        self, namespace: str, name: str, owner: str | None
    ) -> list[HolderInfo]:
        self._check()
        key = (namespace, name)
        now = self._clock()
        handoffs: list[Handoff] = []
        try:
            before = self._table.inspect(key, now, self._wall())
            evicted, handoffs = self._table.force_release(key, owner, now)
        finally:
            self._after(key, handoffs)
        tokens = {hold.token for hold in evicted}
        return [h for h in before.holders if h.token in tokens]

    async def aclose(self) -> None:
        """Stop timers; waiters still queued are told the store closed."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # --- persistence hook -------------------------------------------------------------

    def _persist(self, changes: Changes) -> None:
        """Write ``changes`` durably before any caller hears of them (memory: nothing)."""

    def _commit(self) -> None:
        changes = self._table.take_changes()
        if changes:
            try:
                self._persist(changes)
            except BackendUnavailable as exc:
                # Memory is now ahead of the disk: refuse everything rather than guess.
                self._failure = exc
                raise

    def _check(self) -> None:
        if self._failure is not None:
            raise BackendUnavailable(f"{self.url} is out of service: {self._failure.message}")
        if self._closed:
            raise BackendUnavailable(f"{self.url} is closed")

    # --- waking waiters ---------------------------------------------------------------

    def _after(self, key: Key | None, handoffs: list[Handoff] | None = None) -> None:
        """After every table step: persist what changed, then wake the waiters it granted."""
        self._commit()
        self._deliver([*(handoffs or ()), *self._table.take_handoffs()])
        if key is not None:
            self._arm_timer(key)

    def _deliver(self, handoffs: list[Handoff]) -> None:
        for waiter, grant in handoffs:
            if waiter.wake.done():  # cannot happen: leaving dequeues at once. Never leak.
                self._give_back(waiter.key, grant)
            else:
                waiter.wake.set_result(grant)
            self._arm_timer(waiter.key)

    def _give_back(self, key: Key, grant: Grant) -> None:
        handoffs: list[Handoff] = []
        try:
            _, handoffs = self._table.release(key, grant.owner, grant.token, self._clock())
        except NotHeld:
            pass  # it ended meanwhile: nothing to give back
        finally:
            self._after(key, handoffs)

    def _leave(self, waiter: Waiter[asyncio.Future[Grant]]) -> None:
        self._after(waiter.key, self._table.dequeue(waiter, self._clock()))

    def _arm_timer(self, key: Key) -> None:
        """Wake the queue of ``key`` when its earliest hold expires."""
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        due = self._table.next_expiry(key)
        if due is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, due - self._clock())
        self._timers[key] = loop.call_later(delay, self._expire_now, key)

    def _expire_now(self, key: Key) -> None:
        self._timers.pop(key, None)
        self._after(key, self._table.expire(self._clock()))

    def _start(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self._after(None, self._table.expire(self._clock()))
            for key in self._table.waiting_keys():
                if key not in self._timers:
                    self._arm_timer(key)

    def _timeout(self, key: Key, owner: str, why: str = "") -> AcquireTimeout:
        info = self._table.inspect(key, self._clock(), self._wall())
        holders = ", ".join(f"{h.owner} (token {h.token})" for h in info.holders) or "nobody"
        detail = f"; {why}" if why else ""
        return AcquireTimeout(
            f"{key[1]!r} was not granted in time; held by {holders}{detail}",
            name=key[1],
            owner=owner,
        )


def _granted(future: asyncio.Future[Grant]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


class MemoryBackend(LocalBackend):
    """Locks in this process's memory: for tests and for embedding. Keeps nothing on exit."""

    capabilities = Capabilities(
        safety=SafetyLevel.SINGLE_NODE,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=False,
    )
