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
A sync client's acquire waits in its own thread instead (``RedisDirect``): its grant is
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
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from lockd.backends import redact_url, redis_lua
from lockd.backends.base import AcquireRequest, Backend, undo_on_cancel
from lockd.backends.redis_calls import acquire_args, granted, holder_info, name_keys, not_held
from lockd.backends.redis_conn import (
    Connections,
    blocking_options,
    cluster_option,
    driver_options,
    new_client,
    store_error,
)
from lockd.backends.redis_direct import RedisDirect
from lockd.backends.redis_wait import (
    after_pause,
    check_in_pause,
    delivered_grant,
)
from lockd.errors import BackendUnavailable, InvalidRequest
from lockd.model import Capabilities, Grant, HolderInfo, ResourceInfo, SafetyLevel, WaiterInfo

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import RedisCluster
    from redis.commands.core import AsyncScript

__all__ = ["RedisBackend"]

log = logging.getLogger("lockd")

SUBSCRIBE_TIMEOUT = 2.0
"""Seconds to wait for Redis to confirm a SUBSCRIBE before trying anyway."""
SCRIPTS = ("ACQUIRE", "RELEASE", "EXTEND", "ABANDON", "FORCE_RELEASE", "INSPECT", "RAISE")
WAKE_PREFIX = "lockd:wake:"
"""Wake-up channels are this prefix and a backend's inbox id."""
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
        self._target = cluster_option(url)  # (URL for redis-py, cluster?), checked now
        self._redis: Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._connections: Connections | None = None  # None: through the client
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
        options = driver_options()
        url, cluster = self._target
        client = new_client(url, cluster, options)
        self._redis = client
        for name in SCRIPTS:
            self._scripts[name] = client.register_script(getattr(redis_lua, name))
        if not cluster:  # a cluster routes by key slot, which its client does for us
            self._connections = Connections(url, options)
            self.direct = RedisDirect(self, url, blocking_options(options))
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
        if isinstance(self.direct, RedisDirect):
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
            error = store_error(self.url, exc)
            if error is None:
                raise
            raise error from exc

    async def run_script(
        self, script: str, namespace: str, name: str, *args: str | int
    ) -> list[Any]:
        """Run one of the scripts (``redis_lua.SCRIPTS``) on ``name``'s keys; its reply."""
        connections = self._connections
        if connections is None:  # Redis Cluster: its client routes by the keys' slot
            keys = name_keys(namespace, name)
            reply = await self._call(
                lambda: self._scripts[script](keys=keys, args=[*self._argv, *args])
            )
        else:
            command = self.evalsha(script, namespace, name, args)
            reply = await self._call(lambda: connections.script(command, script))
        return list(reply)

    def evalsha(
        self, script: str, namespace: str, name: str, args: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        """The EVALSHA command of ``script`` on ``name``'s keys (for our own connections)."""
        keys = name_keys(namespace, name)
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
            return granted(await self._step(req, rid, attempt, "try"), req)
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
                               *acquire_args(req, rid, attempt, mode))  # fmt: skip

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
                pause = check_in_pause(reply, end)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await woken.wait()
                woken.clear()
                then = after_pause(self.take_delivered(attempt), end)
                reply = (
                    then if isinstance(then, list) else await self._step(req, rid, attempt, then)
                )
            return granted(reply, req)
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

    async def _release(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        request_id: str | None,
        session: str | None,  # always None: Backend refuses sessions this store does not keep
    ) -> int:
        reply = await self.run_script(
            "RELEASE", namespace, name, owner, token or 0, request_id or ""
        )
        if reply[0] != "ok":
            raise not_held(reply[0], name, owner, token)
        return int(reply[1])

    async def _abandon(self, namespace: str, name: str, owner: str, request_id: str) -> None:
        await self.run_script("ABANDON", namespace, name, owner, request_id)

    async def _extend(
        self,
        namespace: str,
        name: str,
        owner: str,
        token: int | None,
        ttl: float,
        session: str | None,  # always None: Backend refuses sessions this store does not keep
    ) -> Grant:
        ttl_ms = max(1, round(ttl * 1000))
        reply = await self.run_script("EXTEND", namespace, name, owner, token or 0, ttl_ms)
        if reply[0] != "granted":
            raise not_held(reply[0], name, owner, token)
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
            holders=tuple(sorted((holder_info(h) for h in holders), key=lambda h: h.token)),
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
        return sorted((holder_info(h) for h in reply[1]), key=lambda h: h.token)

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
            delivered = delivered_grant(item)
            with self._wake_lock:  # an attempt forgotten meanwhile gets nothing
                event = self._wake.get(attempt)
                if event is not None and delivered is not None:
                    self._delivered[attempt] = delivered
            if event is not None:
                event.set()
