"""The process's I/O thread: one event loop where every client's backend and watchdog run.

Why a thread of our own: renewals must keep going while the caller's thread or event
loop is busy (a long computation, a blocking call). Backends live on this loop only, so
sync and async clients share one implementation, and clients that name the same
``memory://`` or ``file://`` URL share one open store here (reference-counted).

:class:`Call` runs a coroutine there for a caller in another thread or loop, and makes
giving up safe: a caller that abandons an acquire (timeout, Ctrl-C, cancellation) gets
the grant given back if it arrived meanwhile, never leaked; a release is finished even
when its caller stops waiting.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lockd.backends import Backend, connect, store_key

__all__ = ["Call", "Runtime", "runtime"]

T = TypeVar("T")
_MISSING: Any = object()
CLEANUP_WAIT = 5.0
"""Seconds a cancelled async caller waits for its call to wind down in the I/O loop."""


@dataclass
class _Shared:
    backend: Backend
    users: int


class Runtime:
    """One event loop in a daemon thread, and the stores open in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="lockd-io", daemon=True)
        self._stores: dict[str, _Shared] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the I/O loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def in_loop(self) -> bool:
        """True when called from the I/O thread itself."""
        return threading.current_thread() is self._thread

    async def open_store(self, url: str) -> Backend:
        """The shared backend for ``url``, opened on first use (runs on the I/O loop)."""
        key = store_key(url)
        # Two clients opening one URL at once share one store; other URLs are not held up.
        async with self._opening.setdefault(key, asyncio.Lock()):
            shared = self._stores.get(key)
            if shared is None:
                backend = connect(url)
                try:
                    await backend.open()
                except BaseException:
                    await backend.aclose()
                    raise
                shared = self._stores[key] = _Shared(backend, 0)
            shared.users += 1
            return shared.backend

    async def close_store(self, backend: Backend) -> None:
        """Drop one user of a shared backend; the last one closes it."""
        for key, shared in list(self._stores.items()):
            if shared.backend is backend:
                shared.users -= 1
                if shared.users <= 0:
                    del self._stores[key]
                    await backend.aclose()
                return

    def shutdown(self, timeout: float = 5.0) -> None:
        """Close every open store and stop the loop (at interpreter exit)."""
        if not self._thread.is_alive():
            return

        async def close_all() -> None:
            for shared in list(self._stores.values()):
                with contextlib.suppress(Exception):
                    await shared.backend.aclose()
            self._stores.clear()

        with contextlib.suppress(Exception):
            self.submit(close_all()).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


_lock = threading.Lock()
_current: Runtime | None = None
_current_pid = 0


def runtime() -> Runtime:
    """The process's runtime, started on first use (and anew in a forked child)."""
    global _current, _current_pid
    with _lock:
        if _current is None or _current_pid != os.getpid():
            _current, _current_pid = Runtime(), os.getpid()
        return _current


def _shutdown_at_exit() -> None:
    if _current is not None and _current_pid == os.getpid():
        _current.shutdown()


atexit.register(_shutdown_at_exit)


class Call(Generic[T]):
    """A coroutine running on the I/O loop, awaited from another thread or event loop.

    ``give_back`` undoes a result that nobody will receive (an acquire's grant).
    ``finish`` keeps the coroutine running when its caller gives up (a release).
    """

    def __init__(
        self,
        rt: Runtime,
        coro: Coroutine[Any, Any, T],
        *,
        give_back: Callable[[T], Awaitable[object]] | None = None,
        finish: bool = False,
    ) -> None:
        self._rt = rt
        self._give_back = give_back
        self._finish = finish
        self._guard = threading.Lock()
        self._abandoned = False
        self._delivered: T = _MISSING
        self._task: asyncio.Task[T] | None = None
        self._cancel_early = False
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.settled: concurrent.futures.Future[None] = concurrent.futures.Future()
        """Done once nothing of the call runs any more in the I/O loop."""
        rt.loop.call_soon_threadsafe(self._start, coro)

    def _start(self, coro: Coroutine[Any, Any, T]) -> None:
        if self._cancel_early:
            coro.close()
            self.future.cancel()
            self.settled.set_result(None)
            return
        self._task = self._rt.loop.create_task(self._run(coro))
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[T]) -> None:
        if task.cancelled():
            self.future.cancel()
        elif (error := task.exception()) is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(task.result())
        self.settled.set_result(None)

    def _cancel(self) -> None:
        if self._task is None:
            self._cancel_early = True
        else:
            self._task.cancel()

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        result = await coro
        with self._guard:
            if not self._abandoned:
                self._delivered = result
                return result
        if self._give_back is not None:
            await self._give_back(result)
        return result

    def abandon(self) -> None:
        """The caller stops waiting: cancel the call, or give back what it already got."""
        with self._guard:
            self._abandoned = True
            delivered = self._delivered
        if self._finish:
            return
        if delivered is not _MISSING:
            if self._give_back is not None:
                self._rt.submit(_ignore_errors(self._give_back(delivered)))
        else:
            self._rt.loop.call_soon_threadsafe(self._cancel)

    def result(self) -> T:
        """Block this thread for the result (Ctrl-C abandons the call safely)."""
        try:
            return self.future.result()
        except BaseException:
            self.abandon()  # a no-op when the call itself raised
            raise

    async def aresult(self) -> T:
        """Await the result from another event loop (cancellation abandons safely).

        A cancelled caller waits (up to ``CLEANUP_WAIT``) for the call to wind down, so
        that when its cancellation returns, a waiter it had queued has left the queue.
        """
        try:
            return await asyncio.shield(asyncio.wrap_future(self.future))
        except asyncio.CancelledError:
            self.abandon()
            if not self._finish:
                await asyncio.wait({asyncio.wrap_future(self.settled)}, timeout=CLEANUP_WAIT)
            raise


async def _ignore_errors(awaitable: Awaitable[object]) -> None:
    with contextlib.suppress(Exception):
        await awaitable
