"""One-off lock names leave nothing behind in Redis once the retention has passed.

Each name of the growth run is used once, as a lock per order id would be: released,
left to expire (a crashed holder), force-released, shared by a semaphore, or waited for
by a waiter that gave up. With a short retention, every per-name key is gone soon after
the last lease ends, and a pruned name's next token is still above its last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import redis
from lockd import AcquireTimeout, BackendUnavailable, InvalidRequest, LockLost, NotHeld, Revoked
from lockd.backends import Backend
from lockd.backends.redis import RedisBackend
from lockd.backends.redlock import RedlockBackend
from tests.conftest import STORES, cluster_nodes
from tests.redisproc import RedisProcess, running_redis, running_redis_nodes

NS = "default"
TTL = 0.1  # the shortest ttl there is
RETENTION = 0.2
NAMES = int(os.environ.get("LOCKD_GROWTH_NAMES", "3000"))
"""One-off names of the growth run (``make safety`` runs 100,000)."""
PRUNED = TTL + RETENTION + 0.1
"""Seconds after the last call by which every key of an idle name has expired."""


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProcess]:
    """One redis-server for this module's tests."""
    with running_redis() as s:
        yield s


@pytest.fixture
async def backend(server: RedisProcess) -> AsyncIterator[RedisBackend]:
    """A redis backend with a short retention, on an emptied Redis."""
    with redis.Redis(port=server.port) as direct:
        direct.flushall()
    b = RedisBackend(server.url, retention=RETENTION)
    await b.open()
    try:
        yield b
    finally:
        await b.aclose()


def live_keys(port: int) -> list[str]:
    """Every live key (SCAN skips keys whose expiry has passed)."""
    with redis.Redis(port=port, decode_responses=True) as direct:
        return list(direct.scan_iter(match="lockd:*", count=1000))


async def use_once(b: Backend, i: int, ttl: float = TTL) -> bool:
    """Use name ``order:i`` once, one of five ways, with leases of ``ttl``; False when a
    lease ended before the release or extend that followed (LockLost, or NotHeld without
    a token), or RedLock's nodes answered too late: on a loaded machine both happen, and
    the name must be pruned all the same."""
    try:
        await _use_once(b, i, ttl)
    except (LockLost, NotHeld, BackendUnavailable):
        return False
    return True


async def _use_once(b: Backend, i: int, ttl: float) -> None:
    name, kind = f"order:{i}", i % 5
    if kind == 0:  # acquired and released
        grant = await b.acquire(NS, name, "a", ttl=ttl, wait=0, request_id=f"r{i}")
        await b.release(NS, name, "a", grant.token, request_id=f"q{i}")
    elif kind == 1:  # a crashed holder: never released
        await b.acquire(NS, name, "a", ttl=ttl, wait=0, request_id=f"r{i}")
    elif kind == 2:  # force-released by an administrator
        await b.acquire(NS, name, "a", ttl=ttl, wait=0)
        await b.force_release(NS, name)
    elif kind == 3:  # a semaphore: one holder releases, the other is left to expire
        grant = await b.acquire(NS, name, "a", ttl=ttl, wait=0, limit=2)
        await b.acquire(NS, name, "b", ttl=ttl * 2, wait=0, limit=2)
        await b.release(NS, name, "a", grant.token)
    elif i % 50 == 4:  # a waiter that gave up (fewer: each waits a little)
        await b.acquire(NS, name, "a", ttl=ttl, wait=0)
        with contextlib.suppress(AcquireTimeout):  # granted if a's hold ended meanwhile
            await b.acquire(NS, name, "b", ttl=ttl, wait=0.02, request_id=f"w{i}")
    else:  # extended, then released without a token
        await b.acquire(NS, name, "a", ttl=ttl, wait=0)
        await b.extend(NS, name, "a", None, ttl * 2)
        await b.release(NS, name, "a", None)


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[RedisProcess]]:
    """Three redis-servers for this module's RedLock growth run."""
    with running_redis_nodes(3) as servers:
        yield servers


@dataclass
class Grown:
    """A backend for the growth run, its nodes' ports, how many calls run at once and
    their leases: a call on a cluster or RedLock's three nodes costs more, and RedLock
    gives each node a fifth of the ttl to answer."""

    backend: Backend
    ports: list[int]
    batch: int = 100
    ttl: float = TTL


@pytest.fixture(params=["redis", "redis-cluster", "redlock3"])
async def grown(
    request: pytest.FixtureRequest, server: RedisProcess, tmp_path: Path
) -> AsyncIterator[Grown]:
    """A backend of each Redis kind with a short retention, on emptied nodes."""
    with ExitStack() as stack:
        if request.param == "redis":
            with redis.Redis(port=server.port) as direct:
                direct.flushall()
            grown = Grown(RedisBackend(server.url, retention=RETENTION), [server.port])
        elif request.param == "redis-cluster":
            url = stack.enter_context(STORES["redis-cluster"](tmp_path))  # emptied
            ports = [node.port for node in cluster_nodes()]
            grown = Grown(RedisBackend(url, retention=RETENTION), ports, batch=20, ttl=0.5)
        else:
            three: list[RedisProcess] = request.getfixturevalue("nodes")
            for node in three:
                with redis.Redis(port=node.port) as direct:
                    direct.flushall()
            urls = [node.url for node in three]
            backend = RedlockBackend("redlock://test", urls, retention=RETENTION)
            grown = Grown(backend, [node.port for node in three], batch=10, ttl=1.0)
        await grown.backend.open()
        try:
            yield grown
        finally:
            await grown.backend.aclose()


async def test_one_off_names_leave_no_keys_after_the_retention(grown: Grown) -> None:
    completed = 0
    for start in range(0, NAMES, grown.batch):
        done = await asyncio.gather(
            *(use_once(grown.backend, i, grown.ttl) for i in range(start, start + grown.batch))
        )
        completed += sum(done)
        if start + grown.batch == 100:  # records are kept for a while (the retention)
            assert sum(len(live_keys(port)) for port in grown.ports) > 100
    # Every key expires the retention after its name's last lease (2 x ttl: the semaphore).
    await asyncio.sleep(2 * grown.ttl + RETENTION + 0.1)
    assert [live_keys(port) for port in grown.ports] == [[] for _ in grown.ports]
    assert completed >= 0.9 * NAMES  # the run did use its names


async def test_a_held_name_keeps_its_keys_past_the_retention(
    backend: RedisBackend, server: RedisProcess
) -> None:
    grant = await backend.acquire(NS, "long", "a", ttl=PRUNED * 3, wait=0)
    await asyncio.sleep(PRUNED)
    info = await backend.inspect(NS, "long")
    assert [(h.owner, h.token) for h in info.holders] == [("a", grant.token)]
    assert await backend.release(NS, "long", "a", grant.token) == 0


async def test_a_pruned_name_still_gets_a_higher_token(
    backend: RedisBackend, server: RedisProcess
) -> None:
    tokens = []
    for _ in range(3):
        grant = await backend.acquire(NS, "again", "a", ttl=TTL, wait=0)
        tokens.append(grant.token)
        await backend.release(NS, "again", "a", grant.token)
        await asyncio.sleep(PRUNED)
        assert live_keys(server.port) == []
    assert tokens == sorted(set(tokens))
    assert (await backend.inspect(NS, "again")).last_token == 0  # pruned: forgotten


async def test_a_late_release_hears_why_until_the_name_is_pruned(
    backend: RedisBackend,
) -> None:
    evicted = await backend.acquire(NS, "late", "a", ttl=TTL, wait=0)
    await backend.force_release(NS, "late")
    ended = await backend.acquire(NS, "late2", "a", ttl=TTL, wait=0)
    await asyncio.sleep(TTL)  # late2's hold expires; both names are idle now
    with pytest.raises(Revoked):
        await backend.release(NS, "late", "a", evicted.token)
    with pytest.raises(Revoked):
        await backend.release(NS, "late", "a", None)
    with pytest.raises(LockLost):
        await backend.release(NS, "late2", "a", ended.token)
    await asyncio.sleep(PRUNED)
    for name, token in (("late", evicted.token), ("late", None), ("late2", ended.token)):
        with pytest.raises(NotHeld):  # pruned: still an error, and nothing changes
            await backend.release(NS, name, "a", token)


async def test_redlock_nodes_prune_too() -> None:
    retention = RETENTION
    with running_redis_nodes(3) as nodes:
        urls = [s.url for s in nodes]
        b = RedlockBackend("redlock://test", urls, retention=retention)
        await b.open()
        try:
            first = await b.acquire(NS, "rl", "a", ttl=TTL * 2, wait=0)
            await b.release(NS, "rl", "a", first.token)
            await b.acquire(NS, "rl-crashed", "a", ttl=TTL, wait=0)
            started = time.monotonic()
            while any(live_keys(s.port) for s in nodes):
                assert time.monotonic() - started < TTL * 2 + retention + 1, "keys left behind"
                await asyncio.sleep(0.05)
            second = await b.acquire(NS, "rl", "a", ttl=TTL, wait=0)
            assert second.token > first.token
        finally:
            await b.aclose()


async def test_a_names_records_are_pruned_together(backend: RedisBackend) -> None:
    """A force-released name's revocations live as long as its last token: in between,
    the evicted owner would hear LockLost, as if its hold had merely ended."""
    evicted = await backend.acquire(NS, "together", "a", ttl=TTL * 5, wait=0)
    await backend.force_release(NS, "together")  # idle now, its last lease still to run
    await asyncio.sleep(RETENTION + TTL)
    with pytest.raises(Revoked):
        await backend.release(NS, "together", "a", evicted.token)


@pytest.mark.parametrize("retention", [0, -1, 0.0001, 86401, True, "600", float("nan")])
def test_a_retention_out_of_range_is_refused(retention: Any) -> None:
    with pytest.raises(InvalidRequest, match="retention"):
        RedisBackend("redis://127.0.0.1:6379/0", retention=retention)
    with pytest.raises(InvalidRequest, match="retention"):
        RedlockBackend("redlock://test", ["redis://127.0.0.1:6379/0"] * 3, retention=retention)
