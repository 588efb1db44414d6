"""Store outages for every backend: the ``outage`` fixture.

An :class:`~tests.faults.Outage` gives the URL a client under test uses (through the
fault) and a URL of the same store that is never cut (to see what it really holds). The
network stores are reached through :class:`~tests.faults.proxy.Proxy` (one per test, in
front of store processes shared by the module); the memory and file stores through a
:class:`~tests.faults.proxy.Switch`.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

import lockd
from tests.faults import KINDS, Outage, ProxyOutage, SwitchOutage
from tests.faults.proxy import FAULTY, SWITCHES, Proxy, switch
from tests.redisproc import RedisProcess, running_redis, running_redis_nodes
from tests.serverproc import ServerProcess, running_server


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisProcess]:
    """One redis-server for the module (each test uses names of its own)."""
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def shared_nodes() -> Iterator[list[RedisProcess]]:
    """Three redis-servers for the module's RedLock tests."""
    with running_redis_nodes(3) as servers:
        yield servers


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``lockd serve`` over a file store for the module."""
    folder = tmp_path_factory.mktemp("served")
    try:
        with running_server(f"file://{folder / 'store'}") as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=KINDS)
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    """A store of each kind that the test can cut off and restore."""
    kind: str = request.param
    with ExitStack() as stack:
        if kind in ("memory", "file"):
            inner = (
                f"memory://faults-{uuid.uuid4().hex}"
                if kind == "memory"
                else (f"file://{tmp_path / 'store'}")
            )
            try:
                yield SwitchOutage(kind, FAULTY + inner, inner, switch(FAULTY + inner))
            finally:
                SWITCHES.pop(FAULTY + inner, None)
            return
        if kind == "redis":
            server: RedisProcess = request.getfixturevalue("shared_redis")
            proxy = stack.enter_context(Proxy(server.port))
            yield ProxyOutage(kind, proxy.url(), server.url, [proxy])
        elif kind == "http":
            served: ServerProcess = request.getfixturevalue("shared_server")
            port = int(served.url.rsplit(":", 1)[1])
            proxy = stack.enter_context(Proxy(port))
            yield ProxyOutage(kind, proxy.url("http", ""), served.url, [proxy])
        else:
            nodes: list[RedisProcess] = request.getfixturevalue("shared_nodes")
            proxies = [stack.enter_context(Proxy(node.port)) for node in nodes]
            hosts = ",".join(f"127.0.0.1:{p.port}" for p in proxies)
            direct = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
            yield ProxyOutage(kind, f"redlock://{hosts}/0", f"redlock://{direct}/0", proxies)


@pytest.fixture
def name() -> str:
    """A lock name no other test uses (the store processes are shared)."""
    return f"outage-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def observer(outage: Outage) -> Iterator[lockd.Client]:
    """A client on the store that is never cut off: what the store really holds."""
    with lockd.Client(outage.direct_url) as client:
        yield client


@pytest.fixture
def client(outage: Outage) -> Iterator[lockd.Client]:
    """The client under test, cut off with the store."""
    with lockd.Client(outage.url) as c:
        yield c
