"""The ``redis://`` (and ``rediss://``) backend: the lock contract on one Redis.

Layout and scripts are in :mod:`lockd.backends.redis_lua`: every operation is ONE Lua
script that decides inside Redis (owner checks, reentrancy, limits, FIFO order, request
ids, revocations), with Redis's own clock (``TIME``) deciding every expiry. All keys of a
name share one hash tag (``lockd:{NAMESPACE:NAME}:...``), so a Redis Cluster keeps them in
one slot. An idle name (no holds, no waiters) is pruned by Redis itself: every key of it
expires the retention (``retention=``, 10 minutes by default) after its last lease or
waiter deadline, so one-off names (one per order id) leave nothing behind, and until then
a late release or extend of an ended hold still hears ``Revoked`` or ``LockLost``.
Tokens: each new grant's token is above the name's last and at least Redis's clock
(``TIME``) in microseconds. So a counter that is missing (a new or pruned name) or that
Redis lost or restored from older data still gives a token above every earlier one of
the name, as long as the name's grants came slower than one per microsecond and Redis's
clock did not step back (see Clock below): fencing holds whatever Redis persists.

Waiting. Each backend has an *inbox*: a pub/sub channel of its own (``lockd:wake:INBOX``),
subscribed once, before its first blocked acquire (which waits for Redis to confirm).
The acquire script grants the request or queues it in Redis with a *waiter deadline*
(``WAITER_LEASE`` from now). Any script that frees a slot (release, expiry noticed by
any call, force-release, a waiter leaving) grants the queue's head in the same step and
PUBLISHes the grant (token, count, ttl, time waited) to that waiter's inbox, so only the
woken waiter's process wakes, and it needs no further round trip. While queued, a
waiter checks in every ``CHECK_IN`` seconds and at the earliest holder expiry: that
refreshes its deadline and guards against a lost message. A waiter that stops checking
in (crashed, partitioned) is dropped once its deadline has passed, when it reaches the
head of the queue, so it holds up those behind it no longer than that (or, if granted
just before, its ttl).
A cancelled acquire *abandons* its request id, which undoes it whatever it reached.
A sync client's acquire waits in its own thread instead (``_RedisDirect``): its grant is
pushed to a list of its own, which it pops with BLPOP, checking in the same way.

Capabilities: ``single-node`` safety, fencing, fair, not durable, shared across
processes. Durability depends on the Redis persistence settings, which lockd does not
control: with ``appendonly yes`` and ``appendfsync always`` every acknowledged script is
on disk, so holds, token counters and remembered requests survive a Redis restart.
With ``appendfsync everysec`` (the default when AOF is on) a crash can lose about the
last second; with RDB snapshots only, everything since the last snapshot; with no
persistence, everything. A lost hold can be granted to someone else while its holder
still believes it holds it (two holders); a failover to an asynchronous replica has the
same effect. Tokens still never repeat (above). A Redis that evicts keys
(``maxmemory-policy allkeys-*``) drops locks; lockd logs a warning when it sees such a
policy.

Clock. Leases are measured on the Redis host's wall clock (``TIME``), the only clock a
script can read. A step of that clock (a manual change, or NTP stepping rather than
slewing) moves every expiry: a step forward ends every lease early, so a holder can
lose its lock in the store while its own deadline (on its monotonic clock) still reads
held, and another owner can be granted it (two holders); a step back makes leases last
longer, and a token below an earlier one is possible only if the name's counter was lost
too. Run the Redis host with a slewing time daemon. RedLock has the same caveat for each
node (:mod:`lockd.backends.redlock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from lockd.backends import redact_url, redis_lua
from lockd.backends.base import AcquireRequest, Backend, DirectPath, undo_on_cancel
from lockd.errors import (
    AcquireTimeout,
    BackendUnavailable,
    InvalidRequest,
    LockError,
    LockLost,
    NotHeld,
    Revoked,
    StoreRefused,
)
from lockd.model import Capabilities, Grant, HolderInfo, ResourceInfo, SafetyLevel, WaiterInfo

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import RedisCluster
    from redis.commands.core import AsyncScript

__all__ = ["RedisBackend"]

log = logging.getLogger("lockd")

CHECK_IN = 1.0
"""Seconds between a queued waiter's check-ins (the bounded re-check)."""
WAITER_LEASE = 3.0
"""Seconds a queued waiter keeps its place without checking in."""
CALL_TIMEOUT = 10.0
"""Seconds one command may take before its connection is given up (BackendUnavailable)."""
SUBSCRIBE_TIMEOUT = 2.0
"""Seconds to wait for Redis to confirm a SUBSCRIBE before trying anyway."""
SCRIPTS = ("ACQUIRE", "RELEASE", "EXTEND", "ABANDON", "FORCE_RELEASE", "INSPECT", "RAISE")
WAKE_PREFIX = "lockd:wake:"
"""Wake-up channels are this prefix and a backend's inbox id."""
LIST_WAKE = "!"
"""An attempt id starting with this is woken by a push to its own list, not a message."""
REQ_KEY = redis_lua.KEY_SUFFIXES.index("req")
RETENTION = 600.0
"""Seconds an idle name's records (last token, revocations, request ids) are kept."""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisBackend(Backend):
    """Locks in one Redis server (``redis://[[user]:password@]host:port/db``)."""

    capabilities = Capabilities(
        safety=SafetyLevel.SINGLE_NODE,
        fencing=True,
        fair=True,
        durable=False,
        shared_across_processes=True,
    )

    def __init__(
        self,
        url: str,
        inbox: str | None = None,
        retention: float = RETENTION,
        clock_floor: bool = True,
    ) -> None:
        """``retention``: seconds an idle name's records are kept. ``clock_floor``: every
        token is at least Redis's clock in microseconds (else only a missing counter
        starts from it, as RedLock's nodes need to keep agreeing on tokens)."""
        number = isinstance(retention, (int, float)) and not isinstance(retention, bool)
        if not number or not 0.001 <= retention <= 86400:
            raise InvalidRequest(f"retention must be 0.001 to 86400 seconds, not {retention!r}")
        self.url = redact_url(url)
        rule = "clock" if clock_floor else "missing"
        self._argv = (WAKE_PREFIX, str(round(retention * 1000)), rule, "0")  # every script's
        self._target = _cluster_option(url)  # (URL for redis-py, cluster?), checked now
        self._redis: Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._connections: _Connections | None = None  # None: through the client
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self.inbox = inbox or uuid.uuid4().hex
        self._channel = WAKE_PREFIX + self.inbox
        self._attempts = itertools.count()
        self._listening: asyncio.Future[None] | None = None  # done: Redis confirmed
        # The waiters' wake-up tables: the loop's reader fills them, and RedLock's direct
        # path registers and forgets attempts from sync callers' threads, so every use
        # holds _wake_lock (watch, take_delivered, forget_attempt, _wake_up).
        self._wake_lock = threading.Lock()
        self._wake: dict[str, asyncio.Event] = {}  # attempt id -> its waiter's event
        self._delivered: dict[str, list[Any]] = {}  # attempt id -> grant sent by message
        self._background: set[asyncio.Future[Any]] = set()
        self._closed = False

    # --- connection -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, load the scripts and check that Redis answers."""
        import redis.asyncio
        import redis.asyncio.retry
        import redis.retry
        from redis.backoff import NoBackoff

        # No driver retries: a resent script could apply twice. The SDK retries with
        # the same request id instead, which the scripts answer once. The driver's
        # asyncio and blocking connections each take their own kind of Retry.
        options: dict[str, Any] = {
            "decode_responses": True,
            "retry": redis.asyncio.retry.Retry(NoBackoff(), 0),
            "socket_connect_timeout": 5.0,
            "socket_timeout": CALL_TIMEOUT,
        }
        url, cluster = self._target
        client: Redis | RedisCluster
        if cluster:  # keys of one name share a hash tag, so each script runs on one node
            from redis.asyncio.cluster import RedisCluster

            client = RedisCluster.from_url(url, **options)
        else:
            client = redis.asyncio.Redis.from_url(url, **options)
        self._redis = client
        for name in SCRIPTS:
            self._scripts[name] = client.register_script(getattr(redis_lua, name))
        if not cluster:  # a cluster routes by key slot, which its client does for us
            self._connections = _Connections(url, options)
            blocking = {**options, "retry": redis.retry.Retry(NoBackoff(), 0)}
            self.direct = _RedisDirect(self, url, blocking)
        await self.ping()
        with contextlib.suppress(Exception):  # CONFIG may be refused by an ACL
            policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
            if isinstance(policy, str) and policy.startswith("allkeys"):
                log.warning("%s evicts keys (maxmemory-policy %s): locks can vanish",
                            self.url, policy)  # fmt: skip

    async def ping(self) -> None:
        """Raise BackendUnavailable when Redis does not answer."""
        await self._call(lambda: self._client().ping())

    async def aclose(self) -> None:
        """Stop listening and close the connections."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if isinstance(self.direct, _RedisDirect):
            self.direct.close()
        if self._connections is not None:
            await self._connections.aclose()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    def _client(self) -> Redis | RedisCluster:
        if self._redis is None:
            raise BackendUnavailable(f"{self.url} is not open")
        return self._redis

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Await a driver call; its failures become lockd errors."""
        try:
            return await make()
        except Exception as exc:
            error = _store_error(self.url, exc)
            if error is None:
                raise
            raise error from exc

    async def run_script(
        self, script: str, namespace: str, name: str, *args: str | int
    ) -> list[Any]:
        """Run one of the scripts (``redis_lua.SCRIPTS``) on ``name``'s keys; its reply."""
        connections = self._connections
        if connections is None:  # Redis Cluster: its client routes by the keys' slot
            keys = _keys(namespace, name)
            reply = await self._call(
                lambda: self._scripts[script](keys=keys, args=[*self._argv, *args])
            )
        else:
            command = self._evalsha(script, namespace, name, args)
            reply = await self._call(lambda: connections.script(command, script))
        return list(reply)

    def _evalsha(
        self, script: str, namespace: str, name: str, args: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        """The EVALSHA command of ``script`` on ``name``'s keys (for our own connections)."""
        keys = _keys(namespace, name)
        return ("EVALSHA", self._scripts[script].sha, len(keys), *keys, *self._argv, *args)

    # --- the contract -----------------------------------------------------------------

    async def _acquire(self, req: AcquireRequest) -> Grant:
        rid = req.request_id or uuid.uuid4().hex
        return await undo_on_cancel(
            self._wait_for_grant(req, rid, self.new_attempt()),
            lambda: self._abandon(req.namespace, req.name, req.owner, rid),
            self._background,
        )

    async def _wait_for_grant(self, req: AcquireRequest, rid: str, attempt: str) -> Grant:
        if req.wait == 0:
            return self._granted(await self._step(req, rid, attempt, "try"), req)
        end = None if req.wait is None else time.monotonic() + req.wait
        self.watch(attempt, asyncio.Event())
        try:
            await self.listen()  # subscribe first, then try: no wake-up is missed
            reply = await self._step(req, rid, attempt, "new")
        except BaseException:
            self.forget_attempt(attempt)
            raise
        return await self._wait_queued(req, rid, attempt, reply, end)

    async def _step(self, req: AcquireRequest, rid: str, attempt: str, mode: str) -> list[Any]:
        return await self.run_script("ACQUIRE", req.namespace, req.name,
                               *_acquire_args(req, rid, attempt, mode))  # fmt: skip

    async def _wait_queued(
        self, req: AcquireRequest, rid: str, attempt: str, reply: list[Any], end: float | None
    ) -> Grant:
        """Wait while ``reply`` says queued: for the grant message, checking in meanwhile.

        ``attempt`` is watched (from before the request was sent).
        """
        with self._wake_lock:
            woken = self._wake[attempt]  # only this call forgets it
        try:
            while reply[0] == "queued":
                pause = _pause(reply, end)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await woken.wait()
                woken.clear()
                then = _after_pause(self.take_delivered(attempt), end)
                reply = (
                    then if isinstance(then, list) else await self._step(req, rid, attempt, then)
                )
            return self._granted(reply, req)
        finally:
            self.forget_attempt(attempt)

    def watch(self, attempt: str, woken: asyncio.Event) -> None:
        """Set ``woken`` (on the loop) when a wake-up for ``attempt`` arrives; any thread."""
        with self._wake_lock:
            self._wake[attempt] = woken

    def take_delivered(self, attempt: str) -> list[Any] | None:
        """The grant a wake-up brought for ``attempt`` (once), or None; any thread."""
        with self._wake_lock:
            return self._delivered.pop(attempt, None)

    def forget_attempt(self, attempt: str) -> None:
        """Stop watching ``attempt`` and drop a grant delivered for it; any thread."""
        with self._wake_lock:
            self._wake.pop(attempt, None)
            self._delivered.pop(attempt, None)

    def _granted(self, reply: list[Any], req: AcquireRequest) -> Grant:
        """The grant in an acquire's reply, or the error it stands for."""
        name, owner, limit = req.name, req.owner, req.limit
        status = reply[0]
        if status == "granted":
            return Grant(
                name=name,
                owner=owner,
                token=int(reply[1]),
                count=int(reply[2]),
                ttl=max(0.0, int(reply[3]) / 1000),
                waited=int(reply[4]) / 1_000_000,
            )
        if status == "lost":
            raise LockLost("this request was granted before, and that hold has ended",
                           name=name, owner=owner, token=int(reply[1]))  # fmt: skip
        if status == "invalid":
            raise InvalidRequest(
                f"{name!r} is held with limit {int(reply[1])}; this request asks for limit {limit}",
                name=name, owner=owner,
            )  # fmt: skip
        if status in ("denied", "gone"):
            message = f"{name!r} was not granted in time; held by {reply[1]}"
        elif status == "abandoned":
            message = f"{name!r} was not granted: this request was abandoned by its caller"
        else:
            message = f"{name!r} was not granted: replaced by a retry"
        raise AcquireTimeout(message, name=name, owner=owner)

    async def _release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
    ) -> int:
        reply = await self.run_script(
            "RELEASE", namespace, name, owner, token or 0, request_id or ""
        )
        if reply[0] != "ok":
            raise _not_held(reply[0], name, owner, token)
        return int(reply[1])

    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        await self.run_script("ABANDON", namespace, name, owner, request_id)

    async def _extend(
        self, namespace: str, name: str, owner: str, token: int | None, ttl: float
    ) -> Grant:
        ttl_ms = max(1, round(ttl * 1000))
        reply = await self.run_script("EXTEND", namespace, name, owner, token or 0, ttl_ms)
        if reply[0] != "granted":
            raise _not_held(reply[0], name, owner, token)
        return Grant(name=name, owner=owner, token=int(reply[1]), count=int(reply[2]),
                     ttl=max(0.0, int(reply[3]) / 1000))  # fmt: skip

    async def _inspect(self, namespace: str, name: str) -> ResourceInfo:
        reply = await self.run_script("INSPECT", namespace, name)
        _, limit, last, holders, waiters = reply
        return ResourceInfo(
            name=name,
            namespace=namespace,
            limit=int(limit),
            last_token=int(last),
            holders=tuple(sorted((_holder(h) for h in holders), key=lambda h: h.token)),
            waiters=tuple(WaiterInfo(owner=str(o), waited=int(w) / 1_000_000) for o, w in waiters),
        )

    async def _list_locks(self, namespace: str, prefix: str) -> list[ResourceInfo]:
        names = await self.names(namespace, prefix)
        found = [await self._inspect(namespace, name) for name in sorted(names)]
        return [info for info in found if info.holders or info.waiters]

    async def names(self, namespace: str, prefix: str) -> set[str]:
        """Names under ``prefix`` that have a resource record (held or waited for)."""
        head = f"lockd:{{{namespace}:"
        tails = ("}:holds", "}:queue")  # exist while a name is held or waited for
        pattern = _glob_escape(head + prefix) + "*" + _glob_escape("}:") + "[hq][ou][le][du][se]"
        names: set[str] = set()

        async def scan() -> None:
            async for key in self._client().scan_iter(match=pattern, count=1000):
                if key.startswith(head) and key.endswith(tails):
                    names.add(key[len(head) : -len(tails[0])])

        await self._call(scan)
        return names

    async def _force_release(
        self, namespace: str, name: str, owner: str | None
    ) -> list[HolderInfo]:
        reply = await self.run_script("FORCE_RELEASE", namespace, name, owner or "")
        return sorted((_holder(h) for h in reply[1]), key=lambda h: h.token)

    # --- notifications ----------------------------------------------------------------

    def new_attempt(self) -> str:
        """A fresh attempt id whose wake-ups come to this backend's inbox."""
        return f"{self.inbox}.{next(self._attempts)}"

    async def listen(self, confirm_timeout: float = SUBSCRIBE_TIMEOUT) -> None:
        """Subscribe to our inbox (once) and wait up to ``confirm_timeout`` for Redis's OK."""
        listening = self._listening
        if listening is None:
            listening = self._listening = asyncio.get_running_loop().create_future()
            if self._pubsub is None:
                self._pubsub = self._client().pubsub()
            pubsub = self._pubsub
            try:
                await self._call(lambda: pubsub.subscribe(self._channel))
            except BaseException:
                if self._listening is listening:
                    self._listening = None
                    self._drop_pubsub()  # the next waiter starts on a fresh connection
                raise
            if self._reader is None or self._reader.done():
                self._reader = asyncio.ensure_future(self._read())
        if not listening.done():
            with contextlib.suppress(TimeoutError):  # the bounded re-check covers a lost OK
                async with asyncio.timeout(confirm_timeout):
                    await asyncio.shield(listening)

    def listening(self) -> bool:
        """Our inbox subscription is confirmed and its reader runs (read from any thread)."""
        listening, reader = self._listening, self._reader
        return (
            listening is not None and listening.done() and reader is not None and not reader.done()
        )

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            task = asyncio.ensure_future(pubsub.aclose())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _read(self) -> None:
        """Deliver messages: the subscribe confirmation, and wake-ups of local waiters."""
        while not self._closed:
            pubsub = self._pubsub
            if pubsub is None:  # dropped after a failure; the next waiter starts a reader
                return
            try:
                message = await pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the waiters' re-checks carry on meanwhile
                log.debug("redis pub/sub read failed: %s", exc)
                self._listening = None  # the next waiter subscribes again
                await asyncio.sleep(0.2)
                continue
            if not message:
                continue
            kind = message.get("type")
            if kind == "subscribe":
                if self._listening is not None and not self._listening.done():
                    self._listening.set_result(None)
            elif kind == "message":
                self._wake_up(str(message.get("data", "")))

    def _wake_up(self, data: str) -> None:
        """Wake the waiters named in one message, keeping the grants it carries."""
        for item in data.split():
            attempt = item.partition("=")[0]
            delivered = _delivered_grant(item)
            with self._wake_lock:  # an attempt forgotten meanwhile gets nothing
                event = self._wake.get(attempt)
                if event is not None and delivered is not None:
                    self._delivered[attempt] = delivered
            if event is not None:
                event.set()


class _RedisDirect(DirectPath):
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
            return backend._granted(self._acquire_step(req, rid, attempt, "try"), req)
        end = None if req.wait is None else time.monotonic() + req.wait
        reply = self._acquire_step(req, rid, attempt, "new")
        if reply[0] == "queued":
            wake_list = _keys(req.namespace, req.name)[REQ_KEY] + "\twake\t" + attempt
        while reply[0] == "queued":
            pause = _pause(reply, end)
            popped = None
            if pause > 0:  # BLPOP's timeout 0 would block without end
                popped = self._execute(("BLPOP", wake_list, f"{max(pause, 0.001):.3f}"))
            then = _after_pause(_delivered_grant(popped[1]) if popped else None, end)
            reply = then if isinstance(then, list) else self._acquire_step(req, rid, attempt, then)
        return backend._granted(reply, req)

    def _acquire_step(self, req: AcquireRequest, rid: str, attempt: str, mode: str) -> list[Any]:
        return self._run("ACQUIRE", req.namespace, req.name,
                         *_acquire_args(req, rid, attempt, mode))  # fmt: skip

    def release(
        self, namespace: str, name: str, owner: str, token: int | None, request_id: str | None
    ) -> int:
        reply = self._run("RELEASE", namespace, name, owner, token or 0, request_id or "")
        if reply[0] != "ok":
            raise _not_held(reply[0], name, owner, token)
        return int(reply[1])

    def _run(self, script: str, namespace: str, name: str, *args: Any) -> list[Any]:
        command = self._backend._evalsha(script, namespace, name, args)
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
            conn = _new_connection(self._factory)
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
        error = _store_error(self._url, exc) if isinstance(exc, Exception) else None
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


class _Connections:
    """Script calls from the I/O loop, on connections of our own.

    Like ``_RedisDirect`` for sync callers: a free list of the driver's asyncio
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
            conn = _new_connection(self._factory)
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


def _new_connection(factory: Any) -> Any:
    """A new connection with the settings of ``factory`` (a driver ConnectionPool).

    Not ``factory.make_connection()``: the pool counts what it makes against its
    ``max_connections`` (100 by default) and never hears of those we drop, so a
    long-lived path that replaces failed connections would run out."""
    return factory.connection_class(**factory.connection_kwargs)


_directs: weakref.WeakSet[_RedisDirect] = weakref.WeakSet()


def _forget_parent_connections() -> None:
    for direct in _directs:
        direct.forget_connections()


os.register_at_fork(after_in_child=_forget_parent_connections)


def _store_error(url: str, exc: Exception) -> BackendUnavailable | None:
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


def _cluster_option(url: str) -> tuple[str, bool]:
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


def _pause(reply: list[Any], end: float | None) -> float:
    """Seconds a queued waiter waits for its wake-up before checking in: at most
    CHECK_IN, until the earliest holder expiry, and not past its own ``end``."""
    pause = CHECK_IN
    if int(reply[1]) >= 0:  # wake at the earliest holder expiry, too
        pause = min(pause, int(reply[1]) / 1000 + 0.002)
    if end is not None:
        pause = min(pause, end - time.monotonic())
    return pause


def _after_pause(delivered: list[Any] | None, end: float | None) -> list[Any] | str:
    """What a queued waiter does after a pause: take the grant delivered meanwhile (its
    reply), else its next step's mode: ``leave`` once its wait has ended (a grant made
    meanwhile is still its own), or ``wait`` (check in)."""
    if delivered is not None:
        return delivered
    return "leave" if end is not None and time.monotonic() >= end else "wait"


def _delivered_grant(item: str) -> list[Any] | None:
    """The acquire reply carried by a wake-up ``ATTEMPT=token,count,ttl_ms,waited_us``
    (None for a bare ``ATTEMPT``: removed or replaced, to be asked about)."""
    grant = item.partition("=")[2]
    if not grant:
        return None
    token, count, ttl_left, waited = grant.split(",")
    return ["granted", token, count, ttl_left, waited]


def _acquire_args(req: AcquireRequest, rid: str, attempt: str, mode: str) -> tuple[Any, ...]:
    """ARGV[5:] of the ACQUIRE script."""
    ttl_ms = max(1, round(req.ttl * 1000))
    return (req.owner, rid, attempt, ttl_ms, req.limit, mode, round(WAITER_LEASE * 1000))


@functools.lru_cache(maxsize=4096)  # the same few names are locked over and over
def _keys(namespace: str, name: str) -> tuple[str, ...]:
    """The keys of one name, all with one hash tag."""
    base = f"lockd:{{{namespace}:{name}}}"
    return tuple(f"{base}:{suffix}" for suffix in redis_lua.KEY_SUFFIXES)


def _holder(row: list[Any]) -> HolderInfo:
    owner, token, count, ttl_left, held_for, acquired_at = row
    return HolderInfo(
        owner=str(owner),
        token=int(token),
        count=int(count),
        ttl_left=max(0.0, int(ttl_left) / 1000),
        held_for=max(0.0, int(held_for) / 1000),
        acquired_at=int(acquired_at) / 1000,
    )


def _not_held(status: str, name: str, owner: str, token: int | None) -> LockError:
    if status == "revoked":
        return Revoked("the hold was force-released", name=name, owner=owner, token=token)
    if status == "lost":
        return LockLost("the hold has ended", name=name, owner=owner, token=token)
    if status == "not_yours":
        return NotHeld(f"token {token} of {name!r} is another owner's hold, not {owner!r}'s",
                       name=name, owner=owner, token=token)  # fmt: skip
    return NotHeld(f"{owner!r} does not hold {name!r}", name=name, owner=owner, token=token)
