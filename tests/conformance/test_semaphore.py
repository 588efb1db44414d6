"""Semaphores (limit N): never more than N holders at once, each with its own token,
FIFO as slots free, one slot per owner however often it re-enters, and one limit per
name while the name is in use.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import lockd
from lockd import AcquireTimeout, InvalidRequest, Revoked
from tests.conformance.helpers import NS, bqueued, snapshot, start

LIMIT = 3


def test_semaphore_never_admits_more_than_its_limit(client: lockd.Client) -> None:
    guard = threading.Lock()
    inside = 0
    peak = 0

    def use() -> None:
        nonlocal inside, peak
        sem = client.semaphore("pool", LIMIT, ttl=5)
        for _ in range(4):
            with sem:
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.01)
                with guard:
                    inside -= 1

    workers = [start(use) for _ in range(8)]
    for worker in workers:
        worker.outcome(timeout=30)
    assert peak <= LIMIT
    assert peak == LIMIT  # and it does admit that many
    assert client.inspect("pool").holders == ()


async def test_async_semaphore_never_admits_more_than_its_limit(
    aclient: lockd.AsyncClient,
) -> None:
    inside = 0
    peak = 0

    async def use() -> None:
        nonlocal inside, peak
        sem = aclient.semaphore("pool", LIMIT, ttl=5)
        for _ in range(4):
            async with sem:
                inside += 1
                peak = max(peak, inside)
                info = await aclient.inspect("pool")
                assert len(info.holders) <= LIMIT
                await asyncio.sleep(0.01)
                inside -= 1

    await asyncio.gather(*(use() for _ in range(8)))
    assert peak == LIMIT


async def test_semaphore_slots_tokens_and_order(backend: lockd.Backend) -> None:
    grants = [await backend.acquire(NS, "pool", o, ttl=5, wait=0, limit=3) for o in "abc"]
    tokens = [g.token for g in grants]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 3
    with pytest.raises(AcquireTimeout):
        await backend.acquire(NS, "pool", "d", ttl=5, wait=0, limit=3)
    d = asyncio.create_task(backend.acquire(NS, "pool", "d", ttl=5, wait=5, limit=3))
    await bqueued(backend, "pool", 1)
    e = asyncio.create_task(backend.acquire(NS, "pool", "e", ttl=5, wait=5, limit=3))
    await bqueued(backend, "pool", 2)
    info = await backend.inspect(NS, "pool")
    assert info.limit == 3
    assert [h.owner for h in info.holders] == ["a", "b", "c"]
    await backend.release(NS, "pool", "b", grants[1].token)
    d_grant = await asyncio.wait_for(d, 1)
    assert d_grant.token > max(tokens)
    assert not e.done()
    await backend.release(NS, "pool", "a", grants[0].token)
    assert (await asyncio.wait_for(e, 1)).token > d_grant.token


async def test_reentry_uses_one_slot(backend: lockd.Backend) -> None:
    first = await backend.acquire(NS, "pool", "a", ttl=5, wait=0, limit=2)
    again = await backend.acquire(NS, "pool", "a", ttl=5, wait=0, limit=2)
    assert (again.token, again.count) == (first.token, 2)
    await backend.acquire(NS, "pool", "b", ttl=5, wait=0, limit=2)
    with pytest.raises(AcquireTimeout):
        await backend.acquire(NS, "pool", "c", ttl=5, wait=0, limit=2)


def test_one_limit_per_name_in_use(client: lockd.Client, other_client: lockd.Client) -> None:
    sem = client.semaphore("pool", 2, ttl=5)
    sem.acquire()
    before = snapshot(client.inspect("pool"))
    with pytest.raises(InvalidRequest, match="limit"):
        other_client.semaphore("pool", 3, ttl=5).acquire(wait=0)
    with pytest.raises(InvalidRequest, match="limit"):
        other_client.lock("pool", ttl=5).acquire(wait=0)
    assert snapshot(client.inspect("pool")) == before
    sem.release()
    # A name nobody holds or awaits can be used with another limit.
    with other_client.lock("pool", ttl=5) as lock:
        assert lock.owned()
        assert client.inspect("pool").limit == 1


def test_force_release_of_one_semaphore_holder(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    mine = client.semaphore("pool", 2, ttl=5, renew=False)
    theirs = other_client.semaphore("pool", 2, ttl=5, renew=False)
    mine.acquire()
    theirs.acquire()
    evicted = client.force_release("pool", owner=mine.owner)
    assert [h.owner for h in evicted] == [mine.owner]
    assert [h.owner for h in client.inspect("pool").holders] == [theirs.owner]
    with pytest.raises(Revoked):
        mine.extend()
    theirs.extend(3)  # the other holder is untouched
    assert client.inspect("pool").holders[0].ttl_left > 2.5
    theirs.release()
