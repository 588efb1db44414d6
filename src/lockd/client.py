"""The SDK: :class:`Client` (sync) and :class:`AsyncClient`, with their locks and semaphores.

Both are thin facades over one implementation, :class:`lockd._session.Session`, which
runs on the process's I/O thread (``lockd._runtime``). The sync and async classes differ
only in how they wait for it (blocking vs ``await``) and in the default owner: the
client's id plus the current thread (sync) or asyncio task (async), so nested code in
one thread or task re-enters and two threads or tasks never share a hold. Pass
``owner=`` to hand a hold to another thread, process or host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, ClassVar, Generic, ParamSpec, TypeVar

from lockd._runtime import Call, runtime
from lockd._session import HoldState, Session, Want
from lockd.backends import Backend, redact_url, require_safety
from lockd.errors import AcquireTimeout, LockError, NotHeld
from lockd.model import (
    Capabilities,
    Duration,
    HolderInfo,
    LockState,
    ResourceInfo,
    SafetyLevel,
    check_limit,
    check_name,
    check_namespace,
    check_owner,
    check_prefix,
    check_ttl,
    check_wait,
)

__all__ = ["AsyncClient", "AsyncLock", "AsyncSemaphore", "Client", "Lock", "Semaphore"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
DEFAULT_TTL = 30.0
"""Seconds a hold lasts unrenewed. The watchdog renews it every ttl/3 while you hold it."""

_UNSET: Any = object()
OnLost = Callable[[NotHeld], object]


@contextlib.contextmanager
def _body_first(body_error: BaseException | None) -> Iterator[None]:
    """Around the release at the end of a ``with`` block: the body's own exception wins.

    A release that fails (the lock was lost while the body ran, say) raises when the
    body succeeded, so work done partly unprotected never passes unnoticed; when the
    body raised, its exception goes on and carries the release's error as a note.
    """
    try:
        yield
    except LockError as exc:
        if body_error is None:
            raise
        body_error.add_note(f"lockd: the release failed too: {type(exc).__name__}: {exc}")


class _ClientBase:
    """Shared set-up: the store (opened on the I/O thread), namespace, id and session."""

    def __init__(
        self,
        url: str = "memory://",
        *,
        namespace: str = "default",
        require: SafetyLevel | str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.url = url
        self.namespace = check_namespace(namespace)
        self.id = client_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._rt = runtime()
        backend: Backend = self._rt.submit(self._rt.open_store(url)).result()
        try:
            require_safety(backend, require)
        except BaseException:
            self._rt.submit(self._rt.close_store(backend)).result()
            raise
        self.capabilities: Capabilities = backend.capabilities
        self._session = Session(backend, self.namespace, self._rt, redact_url(url))
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T], **kw: Any) -> Call[T]:
        if self._closed:
            coro.close()
            self._session.check_open()
        return Call(self._rt, coro, **kw)

    async def _shutdown(self, release: bool) -> None:
        await self._session.close(release)
        await self._rt.close_store(self._session.backend)

    def __repr__(self) -> str:
        url = redact_url(self.url)
        return f"<{type(self).__name__} {url!r} namespace={self.namespace!r} id={self.id!r}>"


class _LockBase(Generic[T]):
    """What sync and async locks share: parameters, owner, state and the calls they make."""

    def __init__(
        self,
        client: T,
        name: str,
        *,
        ttl: Duration = DEFAULT_TTL,
        wait: Duration | None = None,
        limit: int = 1,
        owner: str | None = None,
        renew: bool = True,
        on_lost: OnLost | None = None,
    ) -> None:
        self.client = client
        self.name = check_name(name)
        self.ttl = check_ttl(ttl)
        self.wait = check_wait(wait)
        self.limit = check_limit(limit)
        self._owner = None if owner is None else check_owner(owner)
        self.renew = renew
        self.on_lost = on_lost
        self._notifiers: dict[object, Callable[[HoldState], None]] = {}
        """One listener per event loop (or one for threads), so nesting calls on_lost once."""
        self._lost_events: dict[object, tuple[HoldState, asyncio.Event]] = {}
        """AsyncLock.lost: per event loop, the hold its event was made for, and the event."""

    # the two facades fill these in
    def _base(self) -> _ClientBase:
        raise NotImplementedError

    def _default_owner(self) -> str:
        raise NotImplementedError

    def _listener(self) -> Callable[[HoldState], None] | None:
        raise NotImplementedError

    @property
    def owner(self) -> str:
        """Who holds when this thread or task acquires: ``owner=`` or the default owner."""
        return self._owner if self._owner is not None else self._default_owner()

    def _hold(self) -> HoldState | None:
        return self._base()._session.hold(self.name, self.owner)

    @property
    def token(self) -> int | None:
        """The fencing token of the current owner's hold (None when not held)."""
        hold = self._hold()
        return None if hold is None else hold.token

    @property
    def count(self) -> int:
        """The current owner's reentrant count in this client (0 when not held); another
        client sharing the owner keeps its own."""
        hold = self._hold()
        return 0 if hold is None or hold.ended else hold.count

    @property
    def lease_left(self) -> float:
        """Seconds until the current owner's hold ends unless renewed, by this process's
        clock (a lower bound of the store's lease); 0.0 when not held."""
        hold = self._hold()
        if hold is None or hold.ended:
            return 0.0
        return max(0.0, hold.deadline - time.monotonic())

    @property
    def state(self) -> LockState:
        """``held``, ``at_risk``, ``lost``, ``revoked`` or ``released`` (also: never held)."""
        hold = self._hold()
        return LockState.RELEASED if hold is None else hold.state_at(time.monotonic())

    def _wait_for(self, wait: Duration | None) -> float | None:
        return self.wait if wait is _UNSET else check_wait(wait)

    def _want(self, wait: Duration | None) -> Want:
        return Want(self.name, self.owner, self.ttl, self._wait_for(wait), self.limit,
                    self.renew, self._listener())  # fmt: skip

    def _acquire_call(self, wait: Duration | None) -> Call[HoldState]:
        base = self._base()
        session = base._session
        name, owner = self.name, self.owner

        async def give_back(_: HoldState) -> None:
            await session.release(name, owner)

        return base._call(session.acquire(self._want(wait)), give_back=give_back)

    def _release_call(self) -> Call[int]:
        base = self._base()
        return base._call(base._session.release(self.name, self.owner), finish=True)

    def _extend_call(self, ttl: Duration | None) -> Call[HoldState | None]:
        base = self._base()
        new_ttl = self.ttl if ttl is None else check_ttl(ttl)
        return base._call(base._session.extend(self.name, self.owner, new_ttl))

    def _inspect_call(self) -> Call[ResourceInfo]:
        base = self._base()
        return base._call(base._session.backend.inspect(base.namespace, self.name))

    def _owns(self, info: ResourceInfo) -> bool:
        hold = self._hold()
        if hold is not None and hold.ended:
            return False
        return any(
            h.owner == self.owner and (hold is None or h.token == hold.token) for h in info.holders
        )

    def __repr__(self) -> str:
        kind = "Semaphore" if self.limit > 1 else "Lock"
        hold = self._hold()
        held = "" if hold is None else f" token={hold.token} count={hold.count}"
        return f"<{type(self).__name__} {kind.lower()} {self.name!r} {self.state.value}{held}>"


# --- sync -----------------------------------------------------------------------------------


class Client(_ClientBase):
    """A blocking lock client. ``Client("file:///var/lib/lockd")``, ``Client("memory://")``.

    Use it from any number of threads. ``require="linearizable"`` refuses weaker stores.
    Closing it stops renewal and releases the holds it still has.
    """

    _thread_ids = threading.local()

    def lock(self, name: str, **options: Any) -> Lock:
        """A lock on ``name`` (ttl, wait, owner, renew, on_lost: see :class:`Lock`)."""
        return Lock(self, name, **options)

    def semaphore(self, name: str, limit: int, **options: Any) -> Semaphore:
        """A semaphore: up to ``limit`` owners hold ``name`` at once."""
        return Semaphore(self, name, limit, **options)

    def inspect(self, name: str) -> ResourceInfo:
        """Holders, waiters and last token of ``name``."""
        return self._call(self._session.backend.inspect(self.namespace, check_name(name))).result()

    def list_locks(self, prefix: str = "") -> list[ResourceInfo]:
        """Every held or awaited name starting with ``prefix``."""
        return self._call(
            self._session.backend.list_locks(self.namespace, check_prefix(prefix))
        ).result()

    def force_release(self, name: str, owner: str | None = None) -> list[HolderInfo]:
        """Evict the holders of ``name`` (admin). Evicted owners get Revoked; tokens move on."""
        return self._call(
            self._session.backend.force_release(self.namespace, check_name(name), owner)
        ).result()

    def close(self, release: bool = True) -> None:
        """Stop renewal and close the store if no other client uses it.

        Holds still had are released, or with ``release=False`` left to end at their ttl
        (so a script can hand a hold to a later process by its owner id).
        """
        if not self._closed:
            self._closed = True
            Call(self._rt, self._shutdown(release), finish=True).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def thread_owner(self) -> str:
        """The default owner for the calling thread."""
        ident = getattr(self._thread_ids, "ident", None)
        if ident is None:
            ident = self._thread_ids.ident = uuid.uuid4().hex[:12]
        return f"{self.id}:thread-{ident}"


class Acquired:
    """What :meth:`Lock.acquire` returns: ``with lock.acquire(wait=5): ...`` releases on exit."""

    def __init__(self, lock: Lock) -> None:
        self.lock = lock
        self.token = lock.token

    def __enter__(self) -> Lock:
        return self.lock

    def __exit__(self, et: object, error: BaseException | None, tb: object) -> None:
        with _body_first(error):
            self.lock.release()


class Lock(_LockBase[Client]):
    """A distributed lock (a semaphore when ``limit > 1``), used from blocking code.

    ``ttl``: seconds a hold lasts unrenewed (renewed every ttl/3 while ``renew``).
    ``wait``: seconds :meth:`acquire` queues (None: no end; 0: try once).
    ``on_lost(error)`` is called from a separate thread when the hold is lost or revoked;
    the ``lost`` event is set and the next operation on the lock raises that error.
    """

    def _base(self) -> _ClientBase:
        return self.client

    def _default_owner(self) -> str:
        return self.client.thread_owner()

    def _listener(self) -> Callable[[HoldState], None] | None:
        callback = self.on_lost
        if callback is None:
            return None

        def notify(hold: HoldState) -> None:
            threading.Thread(target=callback, args=(hold.error(),), daemon=True).start()

        return self._notifiers.setdefault(None, notify)

    def acquire(self, wait: Duration | None = _UNSET) -> Acquired:
        """Block until granted (or ``wait`` seconds pass: AcquireTimeout)."""
        self._acquire(wait)
        return Acquired(self)

    def try_acquire(self) -> bool:
        """Acquire if free right now; never waits."""
        try:
            self._acquire(0)
        except AcquireTimeout:
            return False
        return True

    def _acquire(self, wait: Duration | None) -> None:
        # In this thread when the store offers a direct path, else on the I/O loop.
        hold = self.client._session.acquire_now(self._want(wait))
        if hold is None:
            self._acquire_call(wait).result()

    def release(self) -> None:
        """Release one count (LockLost/Revoked if the hold ended, NotHeld if not held)."""
        if self.client._session.release_now(self.name, self.owner) is None:
            self._release_call().result()

    def extend(self, ttl: Duration | None = None) -> None:
        """Make the hold last ``ttl`` (default: the lock's ttl) seconds from now."""
        self._extend_call(ttl).result()

    def locked(self) -> bool:
        """True when anyone holds the lock (asks the store)."""
        return self._inspect_call().result().locked

    def owned(self) -> bool:
        """True when the current owner holds the lock (asks the store)."""
        return self._owns(self._inspect_call().result())

    @property
    def lost(self) -> threading.Event:
        """Set when the current owner's hold is lost or revoked."""
        hold = self._hold()
        return threading.Event() if hold is None else hold.lost

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, et: object, error: BaseException | None, tb: object) -> None:
        with _body_first(error):
            self.release()

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Use as a decorator: the function runs under the lock."""

        @functools.wraps(func)
        def locked_call(*args: P.args, **kwargs: P.kwargs) -> R:
            with self:
                return func(*args, **kwargs)

        return locked_call


class Semaphore(Lock):
    """Up to ``limit`` owners hold the same name at once: also a "segmented lock"."""

    def __init__(self, client: Client, name: str, limit: int, **options: Any) -> None:
        super().__init__(client, name, limit=limit, **options)


# --- async ----------------------------------------------------------------------------------


class AsyncClient(_ClientBase):
    """The asyncio lock client; same names and behaviour as :class:`Client`."""

    _task_ids: ClassVar[weakref.WeakKeyDictionary[asyncio.Task[Any], str]] = (
        weakref.WeakKeyDictionary()
    )

    def lock(self, name: str, **options: Any) -> AsyncLock:
        """A lock on ``name`` (ttl, wait, owner, renew, on_lost: see :class:`AsyncLock`)."""
        return AsyncLock(self, name, **options)

    def semaphore(self, name: str, limit: int, **options: Any) -> AsyncSemaphore:
        """A semaphore: up to ``limit`` owners hold ``name`` at once."""
        return AsyncSemaphore(self, name, limit, **options)

    async def inspect(self, name: str) -> ResourceInfo:
        """Holders, waiters and last token of ``name``."""
        backend = self._session.backend
        return await self._call(backend.inspect(self.namespace, check_name(name))).aresult()

    async def list_locks(self, prefix: str = "") -> list[ResourceInfo]:
        """Every held or awaited name starting with ``prefix``."""
        backend = self._session.backend
        return await self._call(backend.list_locks(self.namespace, check_prefix(prefix))).aresult()

    async def force_release(self, name: str, owner: str | None = None) -> list[HolderInfo]:
        """Evict the holders of ``name`` (admin). Evicted owners get Revoked; tokens move on."""
        backend = self._session.backend
        return await self._call(
            backend.force_release(self.namespace, check_name(name), owner)
        ).aresult()

    async def aclose(self, release: bool = True) -> None:
        """Stop renewal and close the store; see :meth:`Client.close`."""
        if not self._closed:
            self._closed = True
            await Call(self._rt, self._shutdown(release), finish=True).aresult()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def task_owner(self) -> str:
        """The default owner for the calling asyncio task."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("AsyncLock needs a running asyncio task; use Client outside one")
        ident = self._task_ids.get(task)
        if ident is None:
            ident = self._task_ids[task] = uuid.uuid4().hex[:12]
        return f"{self.id}:task-{ident}"


class AsyncAcquired:
    """What :meth:`AsyncLock.acquire` returns: ``async with await lock.acquire(): ...``."""

    def __init__(self, lock: AsyncLock) -> None:
        self.lock = lock
        self.token = lock.token

    async def __aenter__(self) -> AsyncLock:
        return self.lock

    async def __aexit__(self, et: object, error: BaseException | None, tb: object) -> None:
        with _body_first(error):
            await self.lock.release()


class AsyncLock(_LockBase[AsyncClient]):
    """A distributed lock for asyncio code; see :class:`Lock`. ``on_lost`` runs in the loop
    that acquired (a coroutine function is scheduled as a task). Plain ``with`` is refused.
    """

    def _base(self) -> _ClientBase:
        return self.client

    def _default_owner(self) -> str:
        return self.client.task_owner()

    def _listener(self) -> Callable[[HoldState], None] | None:
        callback = self.on_lost
        if callback is None:
            return None
        loop = asyncio.get_running_loop()

        def run(error: NotHeld) -> None:
            result = callback(error)
            if inspect.isawaitable(result):
                task = loop.create_task(_await(result))
                _callbacks.add(task)
                task.add_done_callback(_callbacks.discard)

        def notify(hold: HoldState) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(run, hold.error())

        return self._notifiers.setdefault(loop, notify)

    async def acquire(self, wait: Duration | None = _UNSET) -> AsyncAcquired:
        """Wait until granted (or ``wait`` seconds pass: AcquireTimeout)."""
        await self._acquire_call(wait).aresult()
        return AsyncAcquired(self)

    async def try_acquire(self) -> bool:
        """Acquire if free right now; never waits."""
        try:
            await self._acquire_call(0).aresult()
        except AcquireTimeout:
            return False
        return True

    async def release(self) -> None:
        """Release one count; completes even if the caller is cancelled."""
        await self._release_call().aresult()

    async def extend(self, ttl: Duration | None = None) -> None:
        """Make the hold last ``ttl`` (default: the lock's ttl) seconds from now."""
        await self._extend_call(ttl).aresult()

    async def locked(self) -> bool:
        """True when anyone holds the lock (asks the store)."""
        return (await self._inspect_call().aresult()).locked

    async def owned(self) -> bool:
        """True when the current owner holds the lock (asks the store)."""
        return self._owns(await self._inspect_call().aresult())

    @property
    def lost(self) -> asyncio.Event:
        """An event in the running loop, set when the current owner's hold ends badly."""
        hold = self._hold()
        if hold is None:
            return asyncio.Event()
        loop = asyncio.get_running_loop()
        made = self._lost_events.get(loop)
        if made is not None and made[0] is hold:
            return made[1]  # one event (and one listener) per hold and loop
        event = asyncio.Event()

        def notify(_: HoldState) -> None:
            loop.call_soon_threadsafe(event.set)

        hold.listeners.append(notify)
        if hold.lost.is_set():
            event.set()
        self._lost_events[loop] = (hold, event)
        return event

    def __enter__(self) -> None:
        raise TypeError("AsyncLock needs `async with`, not `with`")

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        raise TypeError("AsyncLock needs `async with`, not `with`")

    async def __aenter__(self) -> AsyncLock:
        await self.acquire()
        return self

    async def __aexit__(self, et: object, error: BaseException | None, tb: object) -> None:
        with _body_first(error):
            await self.release()

    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        """Use as a decorator on a coroutine function: it runs under the lock."""
        if not inspect.iscoroutinefunction(func):
            raise TypeError("AsyncLock decorates coroutine functions; use Lock for plain ones")

        @functools.wraps(func)
        async def locked_call(*args: P.args, **kwargs: P.kwargs) -> R:
            async with self:
                return await func(*args, **kwargs)

        return locked_call


class AsyncSemaphore(AsyncLock):
    """Up to ``limit`` owners hold the same name at once; see :class:`Semaphore`."""

    def __init__(self, client: AsyncClient, name: str, limit: int, **options: Any) -> None:
        super().__init__(client, name, limit=limit, **options)


_callbacks: set[asyncio.Task[None]] = set()


async def _await(awaitable: Awaitable[object]) -> None:
    await awaitable
