"""Waits longer than one long-poll keep their FIFO place through the server's waiter
lease; a waiter whose next poll never comes is dropped within about that lease."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import lockd
from lockd import LockState
from lockd.backends.http import HttpBackend
from tests.serverproc import ServerProcess, running_server

MAX_POLL = 0.4
LEASE = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    settings = {"LOCKD_MAX_POLL": str(MAX_POLL), "LOCKD_WAITER_LEASE": str(LEASE)}
    with running_server(f"file://{tmp_path / 'store'}", env=settings) as s:
        yield s


async def waiters(http: httpx.AsyncClient, name: str) -> list[str]:
    info = (await http.get(f"/v1/locks/{name}")).json()
    return [w["owner"] for w in info["waiters"]]


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_info_reports_the_configured_poll(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        info = (await http.get("/v1/info")).json()
    assert info["max_poll"] == MAX_POLL and info["waiter_lease"] == LEASE


async def test_waits_spanning_several_polls_stay_fifo(server: ServerProcess) -> None:
    backend = HttpBackend(server.url)
    await backend.open()
    assert backend.max_poll == MAX_POLL
    order: list[str] = []

    async def wait_then_release(owner: str) -> None:
        grant = await backend.acquire("default", "job", owner, ttl=30, wait=20)
        order.append(owner)
        await backend.release("default", "job", owner, grant.token)

    async with httpx.AsyncClient(base_url=server.url) as http:
        await backend.acquire("default", "job", "holder", ttl=30, wait=0)
        tasks = []
        for owner in ("w1", "w2", "w3"):  # each a third of a poll after the one before
            tasks.append(asyncio.ensure_future(wait_then_release(owner)))
            await until(functools.partial(_queued, http, owner))
            await asyncio.sleep(MAX_POLL / 3)
        # Several poll boundaries pass for every waiter; none loses its place at any.
        seen = set()
        end = time.monotonic() + 3 * MAX_POLL
        while time.monotonic() < end:
            seen.add(tuple(await waiters(http, "job")))
            await asyncio.sleep(0.03)
        assert seen == {("w1", "w2", "w3")}
        await backend.release("default", "job", "holder", None)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    await backend.aclose()
    assert order == ["w1", "w2", "w3"]


async def _queued(http: httpx.AsyncClient, owner: str) -> bool:
    return owner in await waiters(http, "job")


async def test_a_grant_made_between_polls_is_kept_for_the_next(server: ServerProcess) -> None:
    poll = {"owner": "w", "ttl": 30, "wait": MAX_POLL, "wait_total": 30, "request_id": "r1"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await http.post("/v1/locks/job/acquire", json={"owner": "holder", "ttl": 30})
        r = await http.post("/v1/locks/job/acquire", json=poll)
        assert r.status_code == 409 and r.json()["error"] == "timeout"
        assert await waiters(http, "job") == ["w"]  # the place is kept after the poll
        await http.post("/v1/locks/job/release", json={"owner": "holder"})
        r = await http.post("/v1/locks/job/acquire", json=poll)
        assert r.status_code == 200, r.text
        assert r.json()["owner"] == "w" and r.json()["count"] == 1
        holders = (await http.get("/v1/locks/job")).json()["holders"]
        assert [(h["owner"], h["count"]) for h in holders] == [("w", 1)]


async def test_a_vanished_waiter_is_dropped_after_the_lease(server: ServerProcess) -> None:
    gone = {"owner": "gone", "ttl": 30, "wait": MAX_POLL, "wait_total": 60, "request_id": "r1"}
    backend = HttpBackend(server.url)
    await backend.open()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await http.post("/v1/locks/job/acquire", json={"owner": "holder", "ttl": 30})
        r = await http.post("/v1/locks/job/acquire", json=gone)  # and never polls again
        poll_ended = time.monotonic()
        assert r.status_code == 409
        nxt = asyncio.ensure_future(backend.acquire("default", "job", "next", ttl=30, wait=20))
        await until(lambda: _queued(http, "next"))
        await http.post("/v1/locks/job/release", json={"owner": "holder"})
        # "gone" is granted (kept for its next poll), then given back at the lease's end.
        grant = await asyncio.wait_for(nxt, 10)
        took = time.monotonic() - poll_ended
        assert grant.owner == "next"
        assert LEASE * 0.9 < took < LEASE + 1.0
        holders = (await http.get("/v1/locks/job")).json()["holders"]
        assert [h["owner"] for h in holders] == ["next"]
        late = await http.post("/v1/locks/job/acquire", json=gone)
        assert late.status_code == 409  # the abandoned request is not granted later
    await backend.aclose()


async def test_a_waiter_that_cancels_between_polls_leaves_at_once(server: ServerProcess) -> None:
    poll = {"owner": "w", "ttl": 30, "wait": MAX_POLL, "wait_total": 30, "request_id": "r1"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await http.post("/v1/locks/job/acquire", json={"owner": "holder", "ttl": 30})
        assert (await http.post("/v1/locks/job/acquire", json=poll)).status_code == 409
        assert await waiters(http, "job") == ["w"]
        r = await http.post("/v1/locks/job/abandon", json={"owner": "w", "request_id": "r1"})
        assert r.status_code == 200
        assert await waiters(http, "job") == []


def test_a_lock_granted_after_many_polls_holds_truthfully(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 s lock granted after about six polls: its grant's ``waited`` covers the whole
    wait, so the SDK keeps that grant, its lease within the store's, and renews it."""
    with lockd.Client(server.url) as client, lockd.Client(server.url) as other:
        backend = client._session.backend
        real_acquire = backend.acquire
        grants: list[lockd.Grant] = []

        async def recorded(*args: Any, **kwargs: Any) -> lockd.Grant:
            grants.append(await real_acquire(*args, **kwargs))
            return grants[-1]

        monkeypatch.setattr(backend, "acquire", recorded)
        holder = other.lock("job", ttl=30, owner="holder")
        holder.acquire()
        lock = client.lock("job", ttl=1, owner="w", wait=20)
        release_later = threading.Timer(2.5, holder.release)
        release_later.start()
        sent = time.monotonic()
        lock.acquire()
        took = time.monotonic() - sent
        release_later.join()
        mine = [g for g in grants if g.owner == "w"]  # both clients share the backend
        assert len(mine) == 1, mine  # kept, not given back as over on arrival
        assert took - MAX_POLL < mine[0].waited <= took
        assert lock.state is LockState.HELD
        holders = other.inspect("job").holders
        local = lock.lease_left
        assert [(h.owner, h.token) for h in holders] == [("w", lock.token)]
        assert 0 < local <= holders[0].ttl_left + 0.02
        time.sleep(1.3)  # renewed, not left to expire (a late answer reads at_risk)
        assert lock.state in (LockState.HELD, LockState.AT_RISK)
        assert [(h.owner, h.token) for h in other.inspect("job").holders] == [("w", lock.token)]
