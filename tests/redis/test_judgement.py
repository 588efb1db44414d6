"""Release and extend of a hold that is not there: the error is judged per name.

First match wins, and nothing changes: a token that is another owner's live hold ->
NotHeld; a force-released token, or no token from an owner whose latest hold of the
name was force-released -> Revoked; a token the name issued -> LockLost; else NotHeld
(a token of another name, or above the name's last). Checked on one Redis, a Redis
Cluster and RedLock, whose scripts and quorum decide it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import lockd
from lockd import LockLost, NotHeld, Revoked
from tests.conformance.helpers import NS, open_backend, snapshot
from tests.conftest import STORES

TTL = 5.0


@pytest.fixture(params=["redis", "redis-cluster", "redlock3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[lockd.Backend]:
    """A fresh backend on each Redis-based store."""
    with STORES[request.param](tmp_path) as url:
        b = await open_backend(url)
        try:
            yield b
        finally:
            await b.aclose()


async def refused(
    backend: lockd.Backend,
    error: type[lockd.LockError],
    name: str,
    owner: str,
    token: int | None,
) -> None:
    """Both release and extend of (name, owner, token) raise ``error`` and change nothing."""
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: backend.release(NS, name, owner, token),
        lambda: backend.extend(NS, name, owner, token, TTL),
    ]
    for call in calls:
        before = snapshot(await backend.inspect(NS, name))
        with pytest.raises(error):
            await call()
        assert snapshot(await backend.inspect(NS, name)) == before


async def test_another_owners_live_token_is_not_held(backend: lockd.Backend) -> None:
    mine = await backend.acquire(NS, "n", "a", ttl=TTL, wait=0)
    await backend.release(NS, "n", "a", mine.token)
    theirs = await backend.acquire(NS, "n", "b", ttl=TTL, wait=0)
    await refused(backend, NotHeld, "n", "a", theirs.token)


async def test_a_force_released_token_is_revoked_and_so_is_its_owner_without_one(
    backend: lockd.Backend,
) -> None:
    evicted = await backend.acquire(NS, "n", "a", ttl=TTL, wait=0)
    await backend.force_release(NS, "n")
    await refused(backend, Revoked, "n", "a", evicted.token)
    await refused(backend, Revoked, "n", "a", None)
    await refused(backend, NotHeld, "n", "b", None)  # another owner was not evicted


async def test_an_evicted_owner_granted_again_is_judged_afresh(backend: lockd.Backend) -> None:
    evicted = await backend.acquire(NS, "n", "a", ttl=TTL, wait=0)
    await backend.force_release(NS, "n")
    again = await backend.acquire(NS, "n", "a", ttl=TTL, wait=0)
    assert again.token > evicted.token
    assert await backend.release(NS, "n", "a", None) == 0
    await refused(backend, NotHeld, "n", "a", None)  # its latest hold was released
    await refused(backend, LockLost, "n", "a", again.token)
    await refused(backend, Revoked, "n", "a", evicted.token)  # that token stays revoked


async def test_an_ended_token_of_this_name_is_lost(backend: lockd.Backend) -> None:
    first = await backend.acquire(NS, "n", "a", ttl=TTL, wait=0)
    await backend.release(NS, "n", "a", first.token)
    await refused(backend, LockLost, "n", "a", first.token)
    await refused(backend, LockLost, "n", "b", first.token)
    await refused(backend, NotHeld, "n", "a", None)


async def test_a_token_this_name_never_issued_is_not_held(backend: lockd.Backend) -> None:
    other = await backend.acquire(NS, "other", "a", ttl=TTL, wait=0)
    await backend.force_release(NS, "other")
    await refused(backend, NotHeld, "fresh", "a", other.token)  # another name's token
    await refused(backend, NotHeld, "fresh", "a", 1)
    held = await backend.acquire(NS, "n", "a", ttl=TTL, wait=0)
    await refused(backend, NotHeld, "n", "b", held.token + 1)  # above the name's last
    await refused(backend, NotHeld, "n", "a", held.token + 10**6)
