"""Contract item 5: blocked acquirers are granted in arrival order, and new arrivals
(the releaser included) never pass queued waiters.
"""

from __future__ import annotations

import asyncio
import functools

import lockd
from tests.conformance.helpers import NS, aqueued, bqueued, queued, start

WAITERS = 5


def test_sync_waiters_are_granted_in_arrival_order(client: lockd.Client) -> None:
    holder = client.lock("fifo", ttl=5)
    holder.acquire()
    owners: dict[int, str] = {}
    order: list[int] = []

    def wait_turn(i: int) -> None:
        lock = client.lock("fifo", ttl=5)
        owners[i] = lock.owner
        with lock.acquire(wait=10):
            order.append(i)

    workers = []
    for i in range(WAITERS):
        workers.append(start(functools.partial(wait_turn, i)))
        queued(client, "fifo", i + 1)
    info = client.inspect("fifo")
    assert [w.owner for w in info.waiters] == [owners[i] for i in range(WAITERS)]
    holder.release()
    for worker in workers:
        worker.outcome()
    assert order == list(range(WAITERS))
    assert client.inspect("fifo").holders == ()


async def test_async_waiters_are_granted_in_arrival_order(aclient: lockd.AsyncClient) -> None:
    holder = aclient.lock("fifo", ttl=5)
    await holder.acquire()
    owners: dict[int, str] = {}
    order: list[int] = []

    async def wait_turn(i: int) -> None:
        lock = aclient.lock("fifo", ttl=5)
        owners[i] = lock.owner
        async with await lock.acquire(wait=10):
            order.append(i)

    tasks = []
    for i in range(WAITERS):
        tasks.append(asyncio.create_task(wait_turn(i)))
        await aqueued(aclient, "fifo", i + 1)
    info = await aclient.inspect("fifo")
    assert [w.owner for w in info.waiters] == [owners[i] for i in range(WAITERS)]
    await holder.release()
    await asyncio.gather(*tasks)
    assert order == list(range(WAITERS))


async def test_backend_grants_in_arrival_order(backend: lockd.Backend) -> None:
    first = await backend.acquire(NS, "fifo", "holder", ttl=5, wait=0)
    grants: list[lockd.Grant] = []

    async def wait_turn(owner: str) -> None:
        grant = await backend.acquire(NS, "fifo", owner, ttl=5, wait=10)
        grants.append(grant)
        await asyncio.sleep(0.001)
        await backend.release(NS, "fifo", owner, grant.token)

    owners = [f"w{i}" for i in range(WAITERS)]
    tasks = []
    for i, owner in enumerate(owners):
        tasks.append(asyncio.create_task(wait_turn(owner)))
        await bqueued(backend, "fifo", i + 1)
    # A newcomer asking with wait=0 does not pass the queue.
    try:
        await backend.acquire(NS, "fifo", "newcomer", ttl=5, wait=0)
        barged = True
    except lockd.AcquireTimeout:
        barged = False
    assert not barged
    assert [w.owner for w in (await backend.inspect(NS, "fifo")).waiters] == owners
    await backend.release(NS, "fifo", "holder", first.token)
    await asyncio.gather(*tasks)
    assert [g.owner for g in grants] == owners
    assert [g.token for g in grants] == sorted(g.token for g in grants)
    assert all(g.waited > 0 for g in grants)


def test_releaser_does_not_retake_ahead_of_a_waiter(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("turns", ttl=5)
    lock.acquire()
    other = other_client.lock("turns", ttl=5)
    got: dict[str, str] = {}

    def wait_then_hold() -> None:
        other.acquire(wait=5)
        got["owner"] = other.owner

    worker = start(wait_then_hold)
    queued(client, "turns", 1)
    lock.release()
    assert not lock.try_acquire()  # the waiter got it, not the releaser
    worker.outcome()
    assert [h.owner for h in client.inspect("turns").holders] == [got["owner"]]
    # The hold is a handle: hand it back from here.
    other_client.lock("turns", owner=got["owner"]).release()
    assert client.inspect("turns").holders == ()
