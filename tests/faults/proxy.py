"""A TCP forwarder a test can cut and restore: the network between a client and a store.

:class:`Proxy` listens on a free loopback port and forwards every connection to the
store's port, in an asyncio loop on a thread of its own. Its modes:

* ``restore()``: forward (the start state).
* ``cut("refuse")``: drop every connection at once; new ones are reset as soon as they
  arrive, so clients fail fast (a store that is down).
* ``cut("blackhole")``: forward nothing and answer nothing; new connections are taken
  but never served, so requests hang (a dead network). Every connection made before
  ``restore()`` is then dropped, its bytes lost, and later ones are served.
* ``pause()``: hold every byte in both directions; ``restore()`` delivers them and the
  connections go on (a long stall).

``close()`` (or leaving the ``with`` block) closes every socket and stops the thread.

The memory and file stores live in the test's own process, so they are cut by a
:class:`Switch` instead: a ``faulty+memory://`` or ``faulty+file://`` URL opens a
:class:`FaultyBackend` in front of the real store.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from lockd.backends import Backend, register_scheme
from lockd.backends.base import AcquireRequest
from lockd.errors import BackendUnavailable
from lockd.model import Grant, HolderInfo, KeepaliveAnswer, ResourceInfo

__all__ = ["FAULTY", "FaultyBackend", "Mode", "Proxy", "Switch", "switch"]

T = TypeVar("T")
CHUNK = 65536
CONTROL_TIMEOUT = 5.0


class Mode(enum.Enum):
    """What the proxy does with traffic now."""

    FORWARD = "forward"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    PAUSE = "pause"


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, epoch: int) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.epoch = epoch
        self.tasks: list[asyncio.Task[None]] = []

    def drop(self) -> None:
        """Close both sides at once (a reset, not a polite close)."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class Proxy:
    """Forward ``127.0.0.1:port`` (a free port) to ``host:target``; see the module doc."""

    def __init__(self, target: int, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.mode = Mode.FORWARD
        self._epoch = 0
        self._links: set[_Link] = set()
        self._accepted: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._shutdowns: set[asyncio.Task[Any] | None] = set()
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-proxy")
        self._thread.start()
        try:
            self._server = self._control(self._listen())
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    # --- the test's side ----------------------------------------------------------------

    def cut(self, how: Literal["refuse", "blackhole"] = "refuse") -> None:
        """Cut the network: ``refuse`` drops and resets, ``blackhole`` makes it hang."""
        mode = Mode.REFUSE if how == "refuse" else Mode.BLACKHOLE
        self._control(self._set(mode))

    def pause(self) -> None:
        """Hold every byte until :meth:`restore` (connections stay up)."""
        self._control(self._set(Mode.PAUSE))

    def restore(self) -> None:
        """Forward again (after a blackhole, the connections made before are dropped)."""
        self._control(self._set(Mode.FORWARD))

    def connections(self) -> int:
        """How many client connections are open through the proxy now."""
        return self._control(self._count())

    def close(self) -> None:
        """Drop every connection, close the listening socket and stop the thread."""
        if self._thread.is_alive():
            self._control(self._shutdown())
            self._stop_loop()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, scheme: str = "redis", suffix: str = "/0") -> str:
        """A store URL that reaches the target through this proxy."""
        return f"{scheme}://127.0.0.1:{self.port}{suffix}"

    # --- in the proxy's loop --------------------------------------------------------------

    def _control(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)
        self._loop.close()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Recorded before its task runs: a task cancelled before its first step never
        # reaches its ``finally``, and shutdown must still close the socket.
        if self._closing:
            writer.transport.abort()
            return
        self._accepted.add(writer)
        self._start(self._serve(reader, writer))

    def _start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _count(self) -> int:
        return len(self._links)

    async def _set(self, mode: Mode) -> None:
        was, self.mode = self.mode, mode
        if mode is Mode.REFUSE or (mode is Mode.FORWARD and was is Mode.BLACKHOLE):
            self._epoch += 1
            for link in list(self._links):
                link.drop()
            self._links.clear()
        if mode is Mode.FORWARD:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _shutdown(self) -> None:
        self._closing = True
        self._shutdowns.add(asyncio.current_task())  # several may run: none waits on another
        # Stop accepting, but close the server only after asyncio's tasks that wrap the
        # sockets already accepted have run: one that runs after the close fails and
        # leaves its socket open (CPython 3.11). Run, they reach _accept, which closes.
        for sock in self._server.sockets:
            self._loop.remove_reader(sock.fileno())
        for link in list(self._links):
            link.drop()
        self._links.clear()
        while tasks := asyncio.all_tasks() - self._shutdowns:
            for task in tasks:
                if task in self._tasks:
                    task.cancel()
            await asyncio.wait(tasks)
        self._server.close()
        for writer in self._accepted:
            writer.transport.abort()
        self._accepted.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONTROL_TIMEOUT / 2):
                await self._server.wait_closed()
        # An aborted transport closes its socket in a callback of the next loop turns:
        # run them before the loop stops, or the sockets are left to the GC.
        for _ in range(3):
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _no_linger(writer)
        if self.mode is Mode.REFUSE:
            writer.transport.abort()
            return
        link = _Link(writer, self._epoch)
        self._links.add(link)
        try:
            await self._flowing.wait()  # blackholed or paused: the connection waits unserved
            if link.epoch != self._epoch:
                return
            try:
                up_reader, link.upstream = await asyncio.open_connection(self.host, self.target)
            except OSError:
                return
            _no_linger(link.upstream)
            link.tasks = [
                self._start(self._pump(link, reader, link.upstream)),
                self._start(self._pump(link, up_reader, writer)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            # A close passes like a byte: held while paused, never while blackholed
            # (a server closing an idle connection must not end a hang early).
            await self._flowing.wait()
        finally:
            self._links.discard(link)
            self._accepted.discard(writer)
            link.drop()

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(CHUNK):
                await self._flowing.wait()  # paused: hold the bytes; blackholed: until dropped
                if link.epoch != self._epoch:
                    return
                sink.write(data)
                await sink.drain()


def _no_linger(writer: asyncio.StreamWriter) -> None:
    """Make closing this socket send a reset, as a crashed peer or a dropped link does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- the in-process stores ----------------------------------------------------------------

FAULTY = "faulty+"
"""Prefix of a URL whose store (memory or file) can be cut: ``faulty+memory://NAME``."""


class Switch:
    """The on/off switch of every :class:`FaultyBackend` opened for one URL."""

    def __init__(self) -> None:
        self.mode = Mode.FORWARD
        self.backends: list[FaultyBackend] = []

    def cut(self, how: Literal["refuse", "blackhole"] = "refuse") -> None:
        """Every call fails with BackendUnavailable (``refuse``: at once; ``blackhole``:
        when restored), calls in flight included."""
        self._set(Mode.REFUSE if how == "refuse" else Mode.BLACKHOLE)

    def restore(self) -> None:
        """Calls reach the store again."""
        self._set(Mode.FORWARD)

    def _set(self, mode: Mode) -> None:
        from lockd._runtime import runtime

        async def apply() -> None:
            self.mode = mode
            for backend in self.backends:
                backend.switched()

        runtime().submit(apply()).result(CONTROL_TIMEOUT)


SWITCHES: dict[str, Switch] = {}
"""The switch of each faulty URL, made when the test asks for it or the store opens."""


def switch(url: str) -> Switch:
    """The switch of ``url`` (a ``faulty+...`` URL)."""
    return SWITCHES.setdefault(url, Switch())


class FaultyBackend(Backend):
    """A real memory or file store, reached through a switch a test can cut.

    While cut, every call raises BackendUnavailable and the calls in flight are
    cancelled in the store (as a dropped connection would leave them) and fail too.
    The store itself is the runtime's shared one for the inner URL, so a client on
    that URL sees the same locks, uncut.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.inner_url = url.removeprefix(FAULTY)
        self._switch = switch(url)
        self._inner: Backend | None = None
        self._flight: set[asyncio.Task[Any]] = set()
        self._restored = asyncio.Event()

    async def open(self) -> None:
        """Open (or share) the real store."""
        from lockd._runtime import runtime

        self._inner = await runtime().open_store(self.inner_url)
        self.capabilities = self._inner.capabilities
        self._switch.backends.append(self)
        self.switched()

    async def aclose(self) -> None:
        """Let go of the real store."""
        from lockd._runtime import runtime

        if self in self._switch.backends:
            self._switch.backends.remove(self)
        if self._inner is not None:
            await runtime().close_store(self._inner)
            self._inner = None

    async def ping(self) -> None:
        """Fail while cut."""
        await self._through(lambda store: store.ping())

    def switched(self) -> None:
        """The switch moved (in the I/O loop): fail the calls in flight if now cut."""
        if self._switch.mode is Mode.FORWARD:
            self._restored.set()
            return
        self._restored.clear()
        for task in list(self._flight):
            task.cancel()

    async def _through(self, call: Callable[[Backend], Awaitable[T]]) -> T:
        """Make ``call`` on the real store unless cut; fail it if cut meanwhile."""
        await self._refused()
        assert self._inner is not None, "open the backend first"
        task = asyncio.ensure_future(call(self._inner))
        self._flight.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # our caller's own cancellation
            await self._refused()
            raise BackendUnavailable(f"{self.url}: cut during the call") from None
        finally:
            self._flight.discard(task)

    async def _refused(self) -> None:
        if self._switch.mode is Mode.BLACKHOLE:
            await self._restored.wait()  # hangs like a dead network, then the reply is lost
            raise BackendUnavailable(f"{self.url}: no answer (blackholed)")
        if self._switch.mode is not Mode.FORWARD:
            raise BackendUnavailable(f"{self.url}: the store is cut off")

    async def _acquire(self, req: AcquireRequest) -> Grant:
        def call(s: Backend) -> Awaitable[Grant]:
            return s.acquire(req.namespace, req.name, req.owner, ttl=req.ttl, wait=req.wait,
                             limit=req.limit, request_id=req.request_id,
                             session=req.session)  # fmt: skip

        return await self._through(call)

    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        await self._through(lambda s: s.abandon(namespace, name, owner, request_id))

    async def _release(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        request_id: str | None,
        session: str | None,
    ) -> int:
        return await self._through(
            lambda s: s.release(namespace, name, owner, token, request_id, session)
        )

    async def _extend(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        ttl: float,
        session: str | None,
    ) -> Grant:
        return await self._through(lambda s: s.extend(namespace, name, owner, token, ttl, session))

    async def _open_session(self, ttl: float) -> str:
        return await self._through(lambda s: s.open_session(ttl))

    async def _keepalive(self, session_ids: list[str]) -> list[KeepaliveAnswer | None]:
        return await self._through(lambda s: s.keepalive(session_ids))

    async def _revoke_session(self, session_id: str) -> None:
        await self._through(lambda s: s.revoke_session(session_id))

    async def _inspect(self, namespace: str, name: str) -> ResourceInfo:
        return await self._through(lambda s: s.inspect(namespace, name))

    async def _list_locks(self, namespace: str, prefix: str) -> list[ResourceInfo]:
        return await self._through(lambda s: s.list_locks(namespace, prefix))

    async def _force_release(
        self, namespace: str, name: str, owner: str | None
    ) -> list[HolderInfo]:
        return await self._through(lambda s: s.force_release(namespace, name, owner))


for _inner in ("memory", "file"):
    register_scheme(FAULTY + _inner, FaultyBackend)
