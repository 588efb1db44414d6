"""Connections to Redis: the driver's client and its options, connections of our own
for script calls on the I/O loop, and the driver's failures as lockd errors."""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from lockd.backends import redis_lua
from lockd.errors import BackendUnavailable, InvalidRequest, StoreRefused

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

CALL_TIMEOUT = 10.0
"""Seconds one command may take before its connection is given up (BackendUnavailable)."""


def driver_options() -> dict[str, Any]:
    """The driver's options for the asyncio client and our own asyncio connections.

    No driver retries: a resent script could apply twice. The SDK retries with the same
    request id instead, which the scripts answer once."""
    import redis.asyncio.retry
    from redis.backoff import NoBackoff

    return {
        "decode_responses": True,
        "retry": redis.asyncio.retry.Retry(NoBackoff(), 0),
        "socket_connect_timeout": 5.0,
        "socket_timeout": CALL_TIMEOUT,
    }


def blocking_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for the driver's blocking connections, which take their own kind of Retry."""
    import redis.retry
    from redis.backoff import NoBackoff

    return {**options, "retry": redis.retry.Retry(NoBackoff(), 0)}


def new_client(url: str, cluster: bool, options: dict[str, Any]) -> Redis | RedisCluster:
    """The driver's asyncio client for ``url``: a Redis Cluster's if ``cluster``."""
    if cluster:  # keys of one name share a hash tag, so each script runs on one node
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, **options)


class Connections:
    """Script calls from the I/O loop, on connections of our own.

    Like ``RedisDirect`` for sync callers: a free list of the driver's asyncio
    connections, each used by one call at a time, and a script sent with
    ``send_packed_command``/``read_response`` rather than through the client's pool,
    retry and per-command timeout layers. The connections have no socket timeout of
    their own (the driver's costs a task per write): one ``CALL_TIMEOUT`` bounds the
    whole call. A connection whose call failed or was cancelled is closed; closing the
    backend closes every connection, in use or not, as the client's pool would.
    """

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        from hiredis import pack_command
        from redis.asyncio import ConnectionPool
        from redis.exceptions import NoScriptError

        self._factory = ConnectionPool.from_url(url, **{**options, "socket_timeout": None})
        self._pack = pack_command  # the driver's own packing is pure Python here
        self._idle: list[Any] = []  # redis.asyncio.Connection (its methods are untyped)
        self._open: set[Any] = set()  # every connection made and not yet closed
        self._closed = False
        self._no_script = NoScriptError

    async def script(self, command: tuple[Any, ...], name: str) -> Any:
        """Run ``EVALSHA`` ``command`` of script ``name``, loading it if Redis lost it."""
        try:
            return await self._exchange(command)
        except self._no_script:  # Redis restarted or flushed its scripts; nothing ran
            await self._exchange(("SCRIPT", "LOAD", getattr(redis_lua, name)))
            return await self._exchange(command)

    async def _exchange(self, command: tuple[Any, ...]) -> Any:
        if self._closed:
            raise ConnectionError("the connections are closed")
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = new_connection(self._factory)
            self._open.add(conn)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await conn.send_packed_command(self._pack(command), check_health=False)
                reply = await conn.read_response(timeout=math.inf)
        except self._no_script:
            await self._put_back(conn)  # the connection itself is fine
            raise
        except BaseException:
            await self._drop(conn)
            raise
        await self._put_back(conn)
        return reply

    async def _put_back(self, conn: Any) -> None:
        if self._closed:  # closed while this call was under way
            await self._drop(conn)
        else:
            self._idle.append(conn)

    async def _drop(self, conn: Any) -> None:
        self._open.discard(conn)
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        """Close every connection; calls made from now on fail."""
        self._closed = True
        self._idle.clear()
        for conn in list(self._open):
            await self._drop(conn)


def new_connection(factory: Any) -> Any:
    """A new connection with the settings of ``factory`` (a driver ConnectionPool).

    Not ``factory.make_connection()``: the pool counts what it makes against its
    ``max_connections`` (100 by default) and never hears of those we drop, so a
    long-lived path that replaces failed connections would run out."""
    return factory.connection_class(**factory.connection_kwargs)


def store_error(url: str, exc: Exception) -> BackendUnavailable | None:
    """The lockd error for a failure of the driver (None: not one of its failures)."""
    from redis.exceptions import (
        AuthenticationError,
        AuthorizationError,
        NoPermissionError,
        RedisError,
        ResponseError,
    )

    if isinstance(exc, (AuthenticationError, AuthorizationError, NoPermissionError)):
        return StoreRefused(f"{url} refused: {exc}")
    if isinstance(exc, ResponseError):
        # A command a script runs but the ACL user may not: a plain ERR from the script.
        if "permission" in str(exc) or "can't run this command" in str(exc):
            return StoreRefused(f"{url} refused: {exc}")
        return BackendUnavailable(f"{url}: {exc}")
    if isinstance(exc, (RedisError, OSError)):
        return BackendUnavailable(f"{url}: {exc}")
    if isinstance(exc, (AttributeError, TypeError, RuntimeError)):
        # the driver's state torn by a disconnect (RuntimeError: a write to a closed
        # uvloop transport, seen when a subscribe follows a Redis restart)
        return BackendUnavailable(f"{url}: {type(exc).__name__}: {exc}")
    return None


def cluster_option(url: str) -> tuple[str, bool]:
    """Take lockd's own ``cluster`` option out of a Redis URL: (url for redis-py, on?)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    cluster = [v for k, v in query if k == "cluster"]
    if not cluster:
        return url, False
    value = cluster[-1].lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidRequest(f"cluster must be true or false, not {cluster[-1]!r}")
    rest = urlencode([(k, v) for k, v in query if k != "cluster"])
    return urlunsplit(parts._replace(query=rest)), value in ("true", "1", "yes")
