"""Contract item 3: the same owner re-enters (same token, higher count) and the hold
ends when the count returns to zero; threads and tasks are different owners unless the
caller passes ``owner=``, which makes the hold a handle others can extend or release.
"""

from __future__ import annotations

import asyncio

import pytest

import lockd
from lockd import AcquireTimeout, LockState, NotHeld
from tests.conformance.helpers import NS, bqueued, start


def _holder_counts(info: lockd.ResourceInfo) -> list[tuple[str, int, int]]:
    return [(h.owner, h.token, h.count) for h in info.holders]


def test_nested_acquire_reenters(client: lockd.Client) -> None:
    lock = client.lock("re", ttl=5)
    with lock:
        token = lock.token
        assert token is not None
        assert lock.count == 1
        with lock:
            assert lock.token == token
            assert lock.count == 2
            assert _holder_counts(client.inspect("re")) == [(lock.owner, token, 2)]
            # Another lock object on the same name in the same thread is the same owner.
            with client.lock("re", ttl=5) as same:
                assert same.token == token
                assert _holder_counts(client.inspect("re")) == [(lock.owner, token, 3)]
        assert lock.count == 1
        assert _holder_counts(client.inspect("re")) == [(lock.owner, token, 1)]
        # Still held: another thread cannot get it.
        assert start(client.lock("re").try_acquire).outcome() is False
        assert lock.state is LockState.HELD
    assert lock.count == 0
    assert lock.state is LockState.RELEASED
    assert client.inspect("re").holders == ()


async def test_async_nested_acquire_reenters(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("re", ttl=5)
    async with lock:
        token = lock.token
        async with lock:
            assert lock.token == token
            assert lock.count == 2
            assert _holder_counts(await aclient.inspect("re")) == [(lock.owner, token, 2)]
        assert lock.count == 1
        assert _holder_counts(await aclient.inspect("re")) == [(lock.owner, token, 1)]
        assert await asyncio.create_task(aclient.lock("re").try_acquire()) is False
    assert lock.count == 0
    assert (await aclient.inspect("re")).holders == ()


def test_threads_are_different_owners(client: lockd.Client) -> None:
    lock = client.lock("owners", ttl=5)
    with lock:
        token = lock.token
        main_owner = lock.owner

        def stranger() -> str:
            # The same lock object, used from another thread, is another owner.
            assert lock.owner != main_owner
            assert not lock.try_acquire()
            mine = client.lock("owners", ttl=5)
            assert not mine.try_acquire()
            with pytest.raises(AcquireTimeout):
                mine.acquire(wait=0)
            with pytest.raises(NotHeld):
                mine.release()
            return mine.owner

        other_owner = start(stranger).outcome()
        assert other_owner != main_owner
        assert lock.owner == main_owner
        assert _holder_counts(client.inspect("owners")) == [(main_owner, token, 1)]
    assert not lock.locked()


async def test_tasks_are_different_owners(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("owners", ttl=5)
    async with lock:
        token = lock.token

        async def stranger() -> str:
            # The same lock object, used from another task: another owner.
            assert lock.owner != mine
            assert not await lock.try_acquire()
            with pytest.raises(NotHeld):
                await lock.release()
            return lock.owner

        mine = lock.owner
        theirs = await asyncio.create_task(stranger())
        assert theirs != mine
        assert _holder_counts(await aclient.inspect("owners")) == [(mine, token, 1)]
    assert not await lock.locked()


def test_explicit_owner_lets_another_thread_extend_and_release(client: lockd.Client) -> None:
    lock = client.lock("handle", ttl=5, owner="job-1")
    lock.acquire()
    assert lock.owner == "job-1"
    token = lock.token

    def finish() -> None:
        mine = client.lock("handle", ttl=5, owner="job-1")
        assert mine.token == token
        mine.extend(2)
        info = client.inspect("handle")
        assert _holder_counts(info) == [("job-1", token, 1)]
        assert 1.5 < info.holders[0].ttl_left <= 2
        mine.release()

    start(finish).outcome()
    assert client.inspect("handle").holders == ()
    assert lock.state is LockState.RELEASED


def test_explicit_owner_is_a_handle_for_another_client(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("handle", ttl=5, owner="job-2", renew=False)
    lock.acquire()
    token = lock.token
    remote = other_client.lock("handle", ttl=5, owner="job-2")
    remote.extend(3)
    info = other_client.inspect("handle")
    assert _holder_counts(info) == [("job-2", token, 1)]
    assert 2.5 < info.holders[0].ttl_left <= 3
    remote.release()
    assert not other_client.lock("handle").locked()


async def test_explicit_owner_shared_by_tasks(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("handle", ttl=5, owner="job-3")

    async def take() -> None:
        await lock.acquire()

    async def give() -> None:
        await lock.release()

    await asyncio.create_task(take())
    assert _holder_counts(await aclient.inspect("handle"))[0][0] == "job-3"
    await asyncio.create_task(give())
    assert (await aclient.inspect("handle")).holders == ()


async def test_backend_reentry_counts(backend: lockd.Backend) -> None:
    first = await backend.acquire(NS, "re", "a", ttl=5, wait=0)
    assert first.count == 1
    # Re-entry is granted at once even with a waiter queued (no queueing behind yourself).
    waiter = asyncio.create_task(backend.acquire(NS, "re", "b", ttl=5, wait=5))
    await bqueued(backend, "re", 1)
    second = await backend.acquire(NS, "re", "a", ttl=5, wait=0)
    assert (second.token, second.count) == (first.token, 2)
    assert await backend.release(NS, "re", "a", first.token) == 1
    info = await backend.inspect(NS, "re")
    assert _holder_counts(info) == [("a", first.token, 1)]
    assert [w.owner for w in info.waiters] == ["b"]
    assert await backend.release(NS, "re", "a", first.token) == 0
    granted = await waiter
    assert granted.owner == "b"
    assert granted.token > first.token
    # The count does not go below zero: a further release is refused.
    with pytest.raises(NotHeld):
        await backend.release(NS, "re", "a", first.token)
    assert _holder_counts(await backend.inspect(NS, "re")) == [("b", granted.token, 1)]
