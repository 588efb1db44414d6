"""The lock objects' forms: ``with``/``async with`` raise when the lock is not granted and
the body never runs unlocked; ``AsyncLock`` refuses plain ``with``; decorators run the
function under the lock; ``acquire()`` returns a handle usable as a context manager.
"""

from __future__ import annotations

import time

import pytest

import lockd
from lockd import AcquireTimeout
from tests.conformance.helpers import start


def test_with_raises_when_not_granted_and_the_body_never_runs(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    client.lock("busy", ttl=5).acquire()
    ran: list[str] = []

    def try_now() -> None:
        with other_client.lock("busy", ttl=5, wait=0):
            ran.append("wait=0")

    def try_briefly() -> None:
        with other_client.lock("busy", ttl=5, wait=0.1):
            ran.append("wait=0.1")

    with pytest.raises(AcquireTimeout):
        try_now()
    started = time.monotonic()
    with pytest.raises(AcquireTimeout):
        try_briefly()
    assert time.monotonic() - started >= 0.1 - 0.01
    assert ran == []
    assert client.inspect("busy").waiters == ()


async def test_async_with_raises_when_not_granted_and_the_body_never_runs(
    aclient: lockd.AsyncClient,
) -> None:
    holder = aclient.lock("busy", ttl=5, owner="holder")
    await holder.acquire()
    ran: list[str] = []

    async def try_now() -> None:
        async with aclient.lock("busy", ttl=5, wait=0):
            ran.append("ran")

    with pytest.raises(AcquireTimeout):
        await try_now()
    assert ran == []
    await holder.release()


async def test_async_lock_refuses_plain_with(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("plain", ttl=5)
    ran: list[str] = []

    def use() -> None:
        with lock:
            ran.append("ran")

    with pytest.raises(TypeError, match="async with"):
        use()
    assert ran == []
    assert (await aclient.inspect("plain")).holders == ()


def test_body_error_releases_and_propagates(client: lockd.Client) -> None:
    lock = client.lock("boom", ttl=5)

    def explode() -> None:
        with lock:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        explode()
    assert not lock.locked()
    assert lock.state is lockd.LockState.RELEASED


def test_acquire_returns_a_context_handle(client: lockd.Client) -> None:
    lock = client.lock("handle", ttl=5)
    with lock.acquire(wait=1) as held:
        assert held is lock
        assert lock.owned()
    assert not lock.locked()
    handle = lock.acquire()
    assert handle.token == lock.token
    lock.release()


async def test_async_acquire_returns_a_context_handle(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("handle", ttl=5)
    async with await lock.acquire(wait=1) as held:
        assert held is lock
        assert await lock.owned()
    assert not await lock.locked()


def test_sync_decorator(client: lockd.Client, other_client: lockd.Client) -> None:
    lock = client.lock("job", ttl=5)

    @lock
    def job(x: int) -> int:
        assert lock.owned()
        return x * 2

    assert job(21) == 42
    assert job.__name__ == "job"
    assert not lock.locked()

    ran: list[int] = []

    @other_client.lock("job", ttl=5, wait=0)
    def refused() -> None:
        ran.append(1)

    with lock, pytest.raises(AcquireTimeout):
        start(refused).outcome()
    assert ran == []


async def test_async_decorator(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("job", ttl=5)

    @lock
    async def job(x: int) -> int:
        assert await lock.owned()
        return x * 2

    assert await job(21) == 42
    assert not await lock.locked()

    holder = aclient.lock("job", ttl=5, owner="holder")
    await holder.acquire()
    ran: list[int] = []

    @aclient.lock("job", ttl=5, wait=0)
    async def refused() -> None:
        ran.append(1)

    with pytest.raises(AcquireTimeout):
        await refused()
    assert ran == []
    await holder.release()

    def plain() -> None: ...

    with pytest.raises(TypeError):
        lock(plain)  # type: ignore[arg-type]


async def test_sync_and_async_clients_exclude_each_other(
    aclient: lockd.AsyncClient, store_url: str
) -> None:
    with lockd.Client(store_url) as sync_client:
        lock = sync_client.lock("mixed", ttl=5)
        with lock:
            assert not await aclient.lock("mixed", ttl=5).try_acquire()
        alock = aclient.lock("mixed", ttl=5)
        assert await alock.try_acquire()
        assert not sync_client.lock("mixed", ttl=5).try_acquire()
        await alock.release()
        assert sync_client.lock("mixed", ttl=5).try_acquire()
