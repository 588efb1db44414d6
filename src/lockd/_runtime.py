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
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lockd.backends import Backend, connect, store_key

__all__ = ["Call", "Runtime", "quietly", "runtime"]

log = logging.getLogger("lockd")

T = TypeVar("T")
_MISSING: Any = object()
CLEANUP_WAIT = 5.0
"""Seconds a cancelled async caller waits for its call to wind down in the I/O loop."""


@dataclass
class _Shared:
    backend: Backend
    users: int


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (its loop iterations and thread wake-ups cost less), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Runtime:
    """One event loop in a daemon thread, and the stores open in it."""

    def __init__(self) -> None:
        self.loop = _new_loop()
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

    The coroutine starts when the caller asks for the result. The handoff is kept light
    because every SDK call makes it: one task in the I/O loop, and one wake-up of the
    caller (a released lock, or a future set in its loop), set up before the call starts
    so that the caller does nothing but wait once it has started it.
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
        self._coro = coro
        self._give_back = give_back
        self._finish = finish
        self._guard = threading.Lock()  # the fields below, shared by caller and I/O thread
        self._abandoned = False
        self._done = False
        """The outcome is recorded (``_result`` or ``_error``)."""
        self._settled = False
        """Nothing of the call runs any more in the I/O loop."""
        self._result: T = _MISSING
        self._error: BaseException | None = None
        self._wake: Callable[[], object] = _nothing
        self._on_settled: Callable[[], object] | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._cancel_early = False

    # --- in the I/O loop --------------------------------------------------------------

    def _start(self) -> None:
        self._task = self._rt.loop.create_task(self._run())

    async def _run(self) -> None:
        # The outcome is handed over here rather than in a done callback: one loop pass less.
        if self._cancel_early:  # abandoned before the task began
            self._coro.close()
            self._finished(_MISSING, asyncio.CancelledError())
            return
        self._running = True
        try:
            result = await self._coro
        except BaseException as exc:  # the call's own error (or cancellation) is its outcome
            self._finished(_MISSING, exc)
        else:
            self._finished(result, None)

    def _finished(self, result: T, error: BaseException | None) -> None:
        with self._guard:
            undo = self._abandoned and error is None and self._give_back is not None
            self._result, self._error, self._done = result, error, True
            self._settled = not undo
            wake, on_settled = self._wake, self._on_settled
        if undo:
            assert self._give_back is not None
            task = self._rt.loop.create_task(quietly(self._give_back(result)))
            task.add_done_callback(self._undone)
            return
        wake()
        if on_settled is not None:
            on_settled()

    def _undone(self, _: object) -> None:
        with self._guard:
            self._settled = True
            on_settled = self._on_settled
        if on_settled is not None:
            on_settled()

    def _cancel(self) -> None:
        if self._running and self._task is not None:
            self._task.cancel()
        else:
            self._cancel_early = True

    # --- in the caller ----------------------------------------------------------------

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._result

    def abandon(self) -> None:
        """The caller stops waiting: cancel the call, or give back what it already got."""
        with self._guard:
            self._abandoned = True
            done, result, error = self._done, self._result, self._error
        if self._finish:
            return
        if not done:
            self._rt.loop.call_soon_threadsafe(self._cancel)
        elif error is None and self._give_back is not None:
            self._rt.submit(quietly(self._give_back(result)))

    def result(self) -> T:
        """Block this thread for the result (Ctrl-C abandons the call safely)."""
        signal = threading.Lock()
        signal.acquire()
        self._wake = signal.release
        try:
            self._rt.loop.call_soon_threadsafe(self._start)
            signal.acquire()  # until the I/O thread releases it
            return self._outcome()
        except BaseException:
            self.abandon()  # a no-op when the call itself raised
            raise

    async def aresult(self) -> T:
        """Await the result from another event loop (cancellation abandons safely).

        A cancelled caller waits (up to ``CLEANUP_WAIT``) for the call to wind down, so
        that when its cancellation returns, a waiter it had queued has left the queue.
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._wake = _waker(loop, waiter)
        try:
            self._rt.loop.call_soon_threadsafe(self._start)
            await waiter
            return self._outcome()
        except asyncio.CancelledError:
            self.abandon()
            if not self._finish:
                settled = loop.create_future()
                with self._guard:
                    if self._settled:
                        settled.set_result(None)
                    else:
                        self._on_settled = _waker(loop, settled)
                await asyncio.wait({settled}, timeout=CLEANUP_WAIT)
            raise


def _waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Callable[[], None]:
    """A function any thread can call to complete ``future`` in its own ``loop``."""

    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    def wake() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(resolve)

    return wake


def _nothing() -> None:
    return


async def quietly(work: Awaitable[object]) -> None:
    """Await ``work`` for a caller that has gone: its failure is only logged."""
    try:
        await work
    except Exception as exc:
        log.warning("finishing an interrupted call failed: %s", exc)
