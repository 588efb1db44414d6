"""A retry of a queued request takes over its place in the Redis queue, and the grant's
``waited`` counts from the retry's arrival, as the lock table's does: never from an
earlier call, which would let a caller's lease start before its request was sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lockd.backends.base import AcquireRequest
from lockd.backends.redis import RedisBackend
from tests.conformance.helpers import NS, open_backend
from tests.conftest import STORES


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[RedisBackend]:
    with STORES["redis"](tmp_path) as url:
        b = await open_backend(url)
        assert isinstance(b, RedisBackend)
        try:
            yield b
        finally:
            await b.aclose()


async def test_a_retry_taking_over_a_queued_place_counts_its_wait_from_the_retry(
    backend: RedisBackend,
) -> None:
    held = await backend.acquire(NS, "queue", "holder", ttl=5, wait=0)
    first = AcquireRequest(NS, "queue", "waiter", 5.0, 5.0, 1, "rid-1")
    await backend._step(first, "rid-1", backend.new_attempt(), "new")  # queued, call lost
    await asyncio.sleep(0.5)
    retry_sent = time.monotonic()
    retry = asyncio.ensure_future(
        backend.acquire(NS, "queue", "waiter", ttl=5, wait=5, request_id="rid-1")
    )
    await asyncio.sleep(0.1)
    assert [w.owner for w in (await backend.inspect(NS, "queue")).waiters] == ["waiter"]
    await backend.release(NS, "queue", "holder", held.token)
    grant = await retry
    assert grant.waited <= time.monotonic() - retry_sent + 0.01
