"""Fixtures shared by every test: one store URL per backend, and clients on it.

A backend joins the conformance suite by adding one entry to ``STORES``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path

import pytest

import lockd
import redis
from tests.redisproc import (
    RedisProcess,
    running_redis,
    running_redis_cluster,
    running_redis_nodes,
)
from tests.serverproc import running_server

StoreFactory = Callable[[Path], AbstractContextManager[str]]


@contextmanager
def _served(tmp: Path) -> Iterator[str]:
    """A real ``lockd serve`` process over a file store, for the http backend."""
    with running_server(f"file://{tmp / 'served'}") as server:
        yield server.url


@contextmanager
def _redis(tmp: Path) -> Iterator[str]:
    """A real ``redis-server`` of its own for each test."""
    del tmp
    with running_redis() as server:
        yield server.url


@pytest.fixture
def redlock_nodes() -> Iterator[list[RedisProcess]]:
    """Three real, independent redis-servers for RedLock fault tests."""
    with running_redis_nodes(3) as servers:
        yield servers


@contextmanager
def _redlock(tmp: Path, nodes: int) -> Iterator[str]:
    """``nodes`` real, independent ``redis-server`` processes behind one RedLock URL."""
    del tmp
    with running_redis_nodes(nodes) as servers:
        yield "redlock://" + ",".join(f"127.0.0.1:{s.port}" for s in servers) + "/0"


_cluster = ExitStack()
_cluster_nodes: list[RedisProcess] = []


@contextmanager
def _redis_cluster(tmp: Path) -> Iterator[str]:
    """A real three-master Redis Cluster, reached through one of its nodes. Making one
    takes seconds, so the session shares one and each test gets it emptied."""
    del tmp
    if not _cluster_nodes:
        _cluster_nodes.extend(_cluster.enter_context(running_redis_cluster(3)))
    for node in _cluster_nodes:
        with redis.Redis(port=node.port) as direct:
            direct.flushall()
    yield f"redis://127.0.0.1:{_cluster_nodes[0].port}/0?cluster=true"


def cluster_nodes() -> list[RedisProcess]:
    """The shared Redis Cluster's nodes (started by the first use of its store)."""
    return list(_cluster_nodes)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the shared Redis Cluster, if a test started it."""
    del session
    _cluster.close()


STORES: dict[str, StoreFactory] = {
    "memory": lambda tmp: nullcontext(f"memory://test-{uuid.uuid4().hex}"),
    "file": lambda tmp: nullcontext(f"file://{tmp / 'store'}"),
    "http": _served,
    "redis": _redis,
    "redis-cluster": _redis_cluster,
    "redlock3": lambda tmp: _redlock(tmp, 3),
    "redlock5": lambda tmp: _redlock(tmp, 5),
}


@pytest.fixture(params=sorted(STORES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store of each kind."""
    with STORES[request.param](tmp_path) as url:
        yield url


@pytest.fixture
def client(store_url: str) -> Iterator[lockd.Client]:
    """A sync client on a fresh store."""
    with lockd.Client(store_url) as c:
        yield c


@pytest.fixture
def other_client(client: lockd.Client, store_url: str) -> Iterator[lockd.Client]:
    """A second client (another identity) on the same store as ``client``."""
    with lockd.Client(store_url) as c:
        yield c


@pytest.fixture
async def aclient(store_url: str) -> AsyncIterator[lockd.AsyncClient]:
    """An async client on a fresh store."""
    async with lockd.AsyncClient(store_url) as c:
        yield c
