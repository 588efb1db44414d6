"""The http backend and the server together: errors that are not retried, retries that
apply once, and a backend used after it was closed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import lockd
from lockd._runtime import _new_loop
from lockd.backends.http import HttpBackend
from tests.faults.proxy import Proxy
from tests.redis.test_security import CLIENT_COMMANDS, SCRIPT_COMMANDS, acl_user
from tests.redisproc import running_redis
from tests.serverproc import ServerProcess, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(f"file://{tmp_path / 'store'}") as s:
        yield s


@pytest.fixture
def refusing_server() -> Iterator[ServerProcess]:
    """A server over a Redis whose ACL lets it take locks but not drop them (no HDEL)."""
    commands = tuple(c for c in SCRIPT_COMMANDS + CLIENT_COMMANDS if c != "hdel")
    with (
        running_redis(*acl_user("carol", "carol-Pw.5", commands)) as redis_server,
        running_server(f"redis://carol:carol-Pw.5@127.0.0.1:{redis_server.port}/0") as s,
    ):
        yield s


def test_store_refused_is_500_not_a_retryable_503(refusing_server: ServerProcess) -> None:
    with httpx.Client(base_url=refusing_server.url, timeout=10) as http:
        assert http.post("/v1/locks/job/acquire", json={"ttl": 30, "owner": "a"}).is_success
        r = http.post("/v1/locks/job/release", json={"owner": "a"})
    assert r.status_code == 500, r.text
    assert r.json()["error"] == "store_refused"
    assert "refused" in r.json()["message"]


async def test_http_backend_raises_store_refused_at_once(refusing_server: ServerProcess) -> None:
    backend = HttpBackend(refusing_server.url, retry_for=5.0)
    await backend.open()
    try:
        await backend.acquire("default", "job", "a", ttl=30, wait=0)
        started = time.monotonic()
        with pytest.raises(lockd.StoreRefused):
            await backend.release("default", "job", "a", None)
        assert time.monotonic() - started < 1.0  # not retried for retry_for seconds
    finally:
        await backend.aclose()


def test_retried_ownerless_acquire_is_applied_once(server: ServerProcess) -> None:
    body = {"ttl": 30, "request_id": "once-1"}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        first = http.post("/v1/locks/job/acquire", json=body).json()
        retry = http.post("/v1/locks/job/acquire", json=body).json()
        holders = http.get("/v1/locks/job").json()["holders"]
    assert (retry["owner"], retry["token"], retry["count"]) == (first["owner"], first["token"], 1)
    assert [(h["owner"], h["count"]) for h in holders] == [(first["owner"], 1)]
    assert len(first["owner"]) >= 16


def test_ownerless_acquires_without_request_id_get_distinct_owners(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        a = http.post("/v1/locks/a/acquire", json={"ttl": 30}).json()["owner"]
        b = http.post("/v1/locks/b/acquire", json={"ttl": 30}).json()["owner"]
    assert a != b


async def test_backend_used_after_close_raises_client_closed(server: ServerProcess) -> None:
    backend = HttpBackend(server.url)
    await backend.open()
    await backend.aclose()
    calls = (
        backend.acquire("default", "job", "a", ttl=30, wait=0),
        backend.release("default", "job", "a", None),
        backend.extend("default", "job", "a", None, 5),
        backend.inspect("default", "job"),
        backend.list_locks("default"),
        backend.ping(),
    )
    for call in calls:
        started = time.monotonic()
        with pytest.raises(lockd.ClientClosed, match="closed"):
            await call
        assert time.monotonic() - started < 0.5  # refused, not retried


def test_a_connection_reset_on_arrival_reads_unreachable() -> None:
    """A reset that lands before the HTTP client reads its new connection's details leaves
    that connection without a socket, and the client library raises AttributeError on the
    SDK's own loop (uvloop); the backend must say BackendUnavailable, as for any reset."""
    seen: Counter[str] = Counter()

    async def calls(port: int) -> None:
        backend = HttpBackend(f"http://127.0.0.1:{port}", retry_for=0.0)
        try:
            for _ in range(300):
                try:
                    await backend.ping()
                except lockd.BackendUnavailable:
                    seen["unavailable"] += 1
                except Exception as exc:  # the test counts what leaks out
                    seen[type(exc).__name__] += 1
        finally:
            await backend.aclose()

    with Proxy(target=1) as refusing, asyncio.Runner(loop_factory=_new_loop) as runner:
        refusing.cut("refuse")  # every connection reset as soon as it arrives
        runner.run(calls(refusing.port))
    assert seen == Counter(unavailable=300), seen
