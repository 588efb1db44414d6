"""Contract item 10: for any name, its holders (owner, token, count, acquired at, time
left, held for), its waiters in order and its last token; listing by prefix.
"""

from __future__ import annotations

import asyncio
import functools
import time

import lockd
from tests.conformance.helpers import NS, bqueued, queued, start


def test_inspect_a_name_nobody_used(client: lockd.Client) -> None:
    info = client.inspect("never")
    assert (info.name, info.namespace, info.limit) == ("never", "default", 1)
    assert info.holders == ()
    assert info.waiters == ()
    assert info.last_token == 0
    assert not info.locked


def test_inspect_shows_the_holder(client: lockd.Client) -> None:
    lock = client.lock("seen", ttl=2)
    with lock:
        token = lock.token
        time.sleep(0.1)
        info = client.inspect("seen")
        assert info.locked
        assert info.limit == 1
        assert info.last_token == lock.token
        (holder,) = info.holders
        assert (holder.owner, holder.token, holder.count) == (lock.owner, lock.token, 1)
        assert 0 < holder.ttl_left <= 2
        assert 0.1 <= holder.held_for < 1.5
        assert abs(holder.acquired_at - time.time()) < 5  # wall clock, for display
        with lock:
            assert client.inspect("seen").holders[0].count == 2
    info = client.inspect("seen")
    assert info.holders == ()
    assert not info.locked
    assert info.last_token == token


def test_inspect_shows_waiters_in_order(client: lockd.Client, other_client: lockd.Client) -> None:
    holder = client.lock("queue", ttl=5)
    holder.acquire()
    owners: list[str] = []
    workers = []

    def take_turn(lock: lockd.Lock) -> None:
        with lock.acquire(wait=5):
            pass

    for i in range(3):
        lock = other_client.lock("queue", ttl=5, owner=f"waiter-{i}")
        owners.append(lock.owner)
        workers.append(start(functools.partial(take_turn, lock)))
        queued(client, "queue", i + 1)
    time.sleep(0.05)
    info = client.inspect("queue")
    assert [w.owner for w in info.waiters] == owners
    waited = [w.waited for w in info.waiters]
    assert all(w >= 0.05 for w in waited)
    assert waited == sorted(waited, reverse=True)  # the first in line waited longest
    holder.release()
    for worker in workers:
        worker.outcome()
    assert client.inspect("queue").waiters == ()


def test_list_locks_by_prefix(client: lockd.Client) -> None:
    names = ["orders:1", "orders:2", "users:1"]
    locks = [client.lock(name, ttl=5) for name in names]
    for lock in locks:
        lock.acquire()
    listed = client.list_locks("orders:")
    assert [info.name for info in listed] == ["orders:1", "orders:2"]
    assert all(info.holders and info.holders[0].owner == locks[0].owner for info in listed)
    assert [info.name for info in client.list_locks()] == sorted(names)
    assert client.list_locks("nothing:") == []
    locks[0].release()
    assert [info.name for info in client.list_locks("orders:")] == ["orders:2"]
    for lock in locks[1:]:
        lock.release()
    assert client.list_locks() == []


async def test_async_inspect_and_list(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("jobs:nightly", ttl=5)
    async with lock:
        info = await aclient.inspect("jobs:nightly")
        assert [(h.owner, h.token) for h in info.holders] == [(lock.owner, lock.token)]
        assert [i.name for i in await aclient.list_locks("jobs:")] == ["jobs:nightly"]
    assert await aclient.list_locks("jobs:") == []


def test_namespaces_are_separate(store_url: str) -> None:
    with (
        lockd.Client(store_url, namespace="tenant-a") as a,
        lockd.Client(store_url, namespace="tenant-b") as b,
    ):
        lock_a = a.lock("shared", ttl=5)
        lock_b = b.lock("shared", ttl=5)
        with lock_a, lock_b:  # the same name in two namespaces: two resources
            info = a.inspect("shared")
            assert info.namespace == "tenant-a"
            assert [h.owner for h in info.holders] == [lock_a.owner]
            assert [h.owner for h in b.inspect("shared").holders] == [lock_b.owner]
            assert [i.namespace for i in a.list_locks()] == ["tenant-a"]
            assert [i.namespace for i in b.list_locks()] == ["tenant-b"]


async def test_backend_inspect_and_list(backend: lockd.Backend) -> None:
    grant = await backend.acquire(NS, "pool", "a", ttl=5, wait=0, limit=2)
    # b's ttl outlasts queueing c and the reads below, even on five slow RedLock nodes.
    await backend.acquire(NS, "pool", "b", ttl=1.0, wait=0, limit=2)
    waiter = asyncio.create_task(backend.acquire(NS, "pool", "c", ttl=5, wait=5, limit=2))
    await bqueued(backend, "pool", 1)
    info = await backend.inspect(NS, "pool")
    assert info.limit == 2
    assert [h.owner for h in info.holders] == ["a", "b"]  # in grant order
    assert [w.owner for w in info.waiters] == ["c"]
    assert [info.name for info in await backend.list_locks(NS, "po")] == ["pool"]
    assert await backend.list_locks("other-ns") == []
    # "b" expires by the store's clock; "c" gets its slot.
    assert (await waiter).owner == "c"
    info = await backend.inspect(NS, "pool")
    assert [h.owner for h in info.holders] == ["a", "c"]
    assert info.last_token > grant.token


async def test_expired_holds_disappear_from_inspect_and_list(backend: lockd.Backend) -> None:
    await backend.acquire(NS, "brief", "a", ttl=0.2, wait=0)
    assert [i.name for i in await backend.list_locks(NS)] == ["brief"]
    await asyncio.sleep(0.25)
    assert (await backend.inspect(NS, "brief")).holders == ()
    assert await backend.list_locks(NS) == []
