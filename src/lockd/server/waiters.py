"""Acquires that outlive one long-poll: the server's waiter lease.

A wait longer than one poll is several polls with one request id. The first poll starts
the backend's acquire for the whole wait. When a poll ends before the acquire does, the
acquire goes on for ``lease`` seconds; the next poll with the same (namespace, name,
owner, request id) takes it up where it is, with its FIFO place, or takes the grant made
meanwhile. When no poll comes within the lease, the acquire is undone: cancelled while
queued (the backend leaves the queue), abandoned when granted (the grant is given back).
So a vanished client holds up those behind it for at most the lease.

Works over any Backend: it only starts, cancels and abandons acquires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from lockd.backends import Backend
from lockd.errors import AcquireTimeout, BackendUnavailable, LockError
from lockd.model import Grant

__all__ = ["Waiters"]

log = logging.getLogger("lockd.server")

Key = tuple[str, str, str, str]
"""(namespace, name, owner, request id)."""


@dataclass(eq=False)
class _Waiter:
    namespace: str
    name: str
    owner: str
    request_id: str | None
    task: asyncio.Task[Grant]
    polls: int = 0
    taken_over: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a newer poll takes the acquire up: the older poll then ends."""
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class Waiters:
    """The acquires in progress that a poll may take up, by request id."""

    def __init__(self, backend: Backend, lease: float) -> None:
        self.backend = backend
        self.lease = lease
        self._table: dict[Key, _Waiter] = {}
        self._undoing: set[asyncio.Task[None]] = set()

    def __contains__(self, key: Key) -> bool:
        return key in self._table

    async def poll(
        self,
        key: Key,
        request_id: str | None,
        start: Callable[[], Coroutine[Any, Any, Grant]],
        *,
        wait: float | None,
        keep: bool,
        gone: Awaitable[object],
        draining: Awaitable[object],
    ) -> Grant:
        """Wait up to ``wait`` seconds (None: until the acquire ends) for the acquire of
        ``key``, started by ``start()`` unless a poll before this one started it.

        ``keep``: another poll will follow, so when this one ends first (its time is up or
        its client is ``gone``) the acquire goes on for the lease; else it is undone.
        ``draining``: the server shuts down; the acquire is undone and this raises
        BackendUnavailable.
        """
        waiter = self._attach(key, request_id, start)
        gone_f, drain_f = asyncio.ensure_future(gone), asyncio.ensure_future(draining)
        over_f = asyncio.ensure_future(waiter.taken_over.wait())
        ended = "cancelled"
        deliver = False
        try:
            done, _ = await asyncio.wait(
                {waiter.task, gone_f, drain_f, over_f},
                timeout=wait,
                return_when=asyncio.FIRST_COMPLETED,
            )
            ended = (
                "drain" if drain_f in done else "gone" if gone_f in done
                else "taken over" if over_f in done else "poll"
            )  # fmt: skip
        finally:
            for future in (gone_f, drain_f, over_f):
                future.cancel()
            waiter.polls -= 1
            deliver = waiter.task.done() and ended != "cancelled"
            if deliver:
                self._forget(key, waiter)
            elif ended == "taken over":
                pass  # the newer poll carries on
            elif ended == "drain" or not keep:
                undoing = self._undo(key, waiter)
                if ended != "cancelled":
                    await asyncio.shield(undoing)
            elif waiter.polls == 0:
                waiter.expiry = asyncio.get_running_loop().call_later(
                    self.lease, self._undo, key, waiter
                )
        if deliver and not waiter.task.cancelled():
            return waiter.task.result()
        if deliver or ended == "taken over":
            what = (
                "was abandoned" if deliver else "was taken over by a retry of the same request_id"
            )
            raise AcquireTimeout(f"this request {what}", name=key[1], owner=key[2])
        if ended == "drain":
            raise BackendUnavailable("server is shutting down; retry", name=key[1], owner=key[2])
        raise AcquireTimeout(
            f"not granted within this poll; the place in the queue is kept {self.lease:g} s "
            "for the next poll with this request_id",
            name=key[1],
            owner=key[2],
        )

    async def abandon(self, key: Key) -> None:
        """Undo the acquire of ``key`` at once, if one is in progress here."""
        waiter = self._table.get(key)
        if waiter is not None:
            await asyncio.shield(self._undo(key, waiter))

    async def aclose(self) -> None:
        """Undo every acquire in progress (the server stops), and wait for the undoing."""
        for key, waiter in list(self._table.items()):
            self._undo(key, waiter)
        if self._undoing:
            await asyncio.gather(*self._undoing, return_exceptions=True)

    def _attach(
        self, key: Key, request_id: str | None, start: Callable[[], Coroutine[Any, Any, Grant]]
    ) -> _Waiter:
        waiter = self._table.get(key) if request_id is not None else None
        if waiter is None:
            waiter = _Waiter(*key[:3], request_id, asyncio.ensure_future(start()))
            if request_id is not None:
                self._table[key] = waiter
        else:
            if waiter.expiry is not None:
                waiter.expiry.cancel()
                waiter.expiry = None
            waiter.taken_over.set()
            waiter.taken_over = asyncio.Event()
        waiter.polls += 1
        return waiter

    def _forget(self, key: Key, waiter: _Waiter) -> None:
        if self._table.get(key) is waiter:
            del self._table[key]
        if waiter.expiry is not None:
            waiter.expiry.cancel()
            waiter.expiry = None

    def _undo(self, key: Key, waiter: _Waiter) -> asyncio.Task[None]:
        """Forget ``waiter`` and undo its acquire in the background (the task is returned)."""
        self._forget(key, waiter)
        task = asyncio.ensure_future(self._give_back(waiter))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)
        return task

    async def _give_back(self, waiter: _Waiter) -> None:
        if not waiter.task.done():
            waiter.task.cancel()  # the backend leaves the queue, or gives back a grant
        try:
            grant = await waiter.task
        except (Exception, asyncio.CancelledError):
            return  # not granted: nothing to give back
        try:
            if waiter.request_id is not None:
                await self.backend.abandon(
                    waiter.namespace, waiter.name, waiter.owner, waiter.request_id
                )
            else:
                await self.backend.release(waiter.namespace, waiter.name, waiter.owner, grant.token)
        except LockError as exc:
            log.warning(
                "could not give back %r's grant of %r (token %d) after its poll ended: %s",
                waiter.owner, waiter.name, grant.token, exc,
            )  # fmt: skip
