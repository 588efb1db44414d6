"""The blocking direct path: a sync caller's acquire and release, in its own thread."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, NoReturn

from lockd.backends import redis_lua
from lockd.backends.base import AcquireRequest, DirectPath
from lockd.backends.redis_calls import acquire_args, granted, name_keys, not_held
from lockd.backends.redis_conn import new_connection, store_error
from lockd.backends.redis_wait import after_pause, check_in_pause, delivered_grant
from lockd.model import Grant

if TYPE_CHECKING:
    from lockd.backends.redis import RedisBackend

LIST_WAKE = "!"
"""An attempt id starting with this is woken by a push to its own list, not a message."""
REQ_KEY = redis_lua.KEY_SUFFIXES.index("req")


class RedisDirect(DirectPath):
    """Acquire and release from a sync caller's thread, on blocking connections.

    A script call here costs about half of one made through the I/O loop: no thread
    hand-offs, and the connection is used directly (``send_packed_command``/``read_response``)
    rather than through the client's per-command pool and retry layers. Connections are
    kept in a free list, taken by one thread at a time; a connection that fails is
    dropped. A queued acquire waits in the caller's thread too: its attempt id starts
    with ``LIST_WAKE``, so its wake-up is pushed to a list of its own, which it pops with
    BLPOP (bounded by the check-in interval) instead of a message to the I/O loop.
    """

    def __init__(self, backend: RedisBackend, url: str, options: dict[str, Any]) -> None:
        from hiredis import pack_command
        from redis.exceptions import NoScriptError

        from redis import ConnectionPool

        self._backend = backend
        self._url = backend.url
        self._factory = ConnectionPool.from_url(url, **options)  # makes connections only
        self._idle: list[Any] = []  # redis.Connection (its methods are untyped)
        self._no_script = NoScriptError  # bound once: the calls below are the hot path
        self._pack = pack_command  # hiredis's, without the driver's checks around it
        self._closed = False
        _directs.add(self)

    def acquire(self, req: AcquireRequest) -> Grant:
        backend = self._backend
        rid = req.request_id or uuid.uuid4().hex
        attempt = LIST_WAKE + backend.new_attempt()
        if req.wait == 0:
            return granted(self._acquire_step(req, rid, attempt, "try"), req)
        end = None if req.wait is None else time.monotonic() + req.wait
        reply = self._acquire_step(req, rid, attempt, "new")
        if reply[0] == "queued":
            wake_list = name_keys(req.namespace, req.name)[REQ_KEY] + "\twake\t" + attempt
        while reply[0] == "queued":
            pause = check_in_pause(reply, end)
            popped = None
            if pause > 0:  # BLPOP's timeout 0 would block without end
                popped = self._execute(("BLPOP", wake_list, f"{max(pause, 0.001):.3f}"))
            then = after_pause(delivered_grant(popped[1]) if popped else None, end)
            reply = then if isinstance(then, list) else self._acquire_step(req, rid, attempt, then)
        return granted(reply, req)

    def _acquire_step(self, req: AcquireRequest, rid: str, attempt: str, mode: str) -> list[Any]:
        return self._run("ACQUIRE", req.namespace, req.name,
                         *acquire_args(req, rid, attempt, mode))  # fmt: skip

    def release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
    ) -> int:
        reply = self._run("RELEASE", namespace, name, owner, token or 0, request_id or "")
        if reply[0] != "ok":
            raise not_held(reply[0], name, owner, token)
        return int(reply[1])

    def _run(self, script: str, namespace: str, name: str, *args: Any) -> list[Any]:
        command = self._backend.evalsha(script, namespace, name, args)
        try:
            reply = self._execute(command)
        except self._no_script:  # Redis restarted or flushed its scripts; nothing ran
            self.load(script)
            reply = self._execute(command)
        return list(reply)

    def load(self, script: str) -> None:
        """Load ``script`` (a name in :mod:`redis_lua`) into Redis, after a NOSCRIPT reply."""
        self._execute(("SCRIPT", "LOAD", getattr(redis_lua, script)))

    def _execute(self, command: tuple[Any, ...]) -> Any:
        """Send one command on an idle connection and read its reply."""
        return self.receive(self.send(command))

    def send(self, command: tuple[Any, ...], timeout: float | None = None) -> Any:
        """Send ``command`` on an idle connection; returns the connection, for
        :meth:`receive`. ``timeout``: a new connection's bound on each step of its
        set-up (connect, handshake) and on each later socket operation without its own."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = new_connection(self._factory)
            if timeout is not None:
                conn.socket_connect_timeout = conn.socket_timeout = timeout
        try:
            conn.send_packed_command([self._pack(command)], check_health=False)
        except BaseException as exc:
            self._raise_dropped(conn, exc)
        return conn

    def receive(self, conn: Any, timeout: float | None = None) -> Any:
        """Read the reply to the command :meth:`send` sent on ``conn`` (within ``timeout``
        s, if given), and put the connection back."""
        try:
            reply = conn.read_response() if timeout is None else conn.read_response(timeout=timeout)
        except self._no_script:
            self._put_back(conn)  # the connection itself is fine
            raise
        except BaseException as exc:
            self._raise_dropped(conn, exc)
        self._put_back(conn)
        return reply

    def drop(self, conn: Any) -> None:
        """Close a connection whose reply will not be read."""
        with contextlib.suppress(Exception):
            conn.disconnect()

    def _raise_dropped(self, conn: Any, exc: BaseException) -> NoReturn:
        """Close ``conn`` after ``exc``; raise lockd's error for a store failure, else ``exc``."""
        self.drop(conn)
        error = store_error(self._url, exc) if isinstance(exc, Exception) else None
        if error is None:
            raise exc
        raise error from exc

    def has_idle(self) -> bool:
        """Whether a connection is ready (a new one would first wait for Redis)."""
        return bool(self._idle)

    def _put_back(self, conn: Any) -> None:
        if self._closed:  # closed while this call was under way
            conn.disconnect()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their call ends."""
        self._closed = True
        while self._idle:
            with contextlib.suppress(Exception):
                self._idle.pop().disconnect()

    def forget_connections(self) -> None:
        """Drop the connections without closing them (in a forked child: they are the
        parent's)."""
        self._idle = []


_directs: weakref.WeakSet[RedisDirect] = weakref.WeakSet()


def _forget_parent_connections() -> None:
    for direct in _directs:
        direct.forget_connections()


os.register_at_fork(after_in_child=_forget_parent_connections)
