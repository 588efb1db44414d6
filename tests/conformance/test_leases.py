"""Contract items 2 and 9: holds are leases on the store's clock; the watchdog keeps a
living holder's lease; a hold that is not extended ends at its ttl, and after that its
owner's extend and release fail with ``LockLost``.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import lockd
from lockd import LockLost, LockState
from tests.conformance.helpers import NS, SLACK, bqueued, open_backend

TTL = 0.3
RENEWED_TTL = 0.45
"""Holds kept by the watchdog: renewed every 0.15 s, with 0.3 s to spare per renewal."""


def test_unrenewed_hold_frees_at_its_ttl(client: lockd.Client, other_client: lockd.Client) -> None:
    lock = client.lock("lease", ttl=TTL, renew=False)
    started = time.monotonic()
    lock.acquire()
    token = lock.token
    assert token is not None

    other = other_client.lock("lease", ttl=5)
    other.acquire(wait=2)
    freed_after = time.monotonic() - started
    # Never before the ttl (the store counts from its grant, after `started`) ...
    assert freed_after >= TTL - 0.005
    # ... and promptly after it.
    assert freed_after < TTL + SLACK
    # The SDK gave the hold up no later than the store did.
    assert lock.state is LockState.LOST
    assert lock.lost.is_set()

    info = other_client.inspect("lease")
    assert [h.owner for h in info.holders] == [other.owner]
    assert other.token is not None and other.token > token

    with pytest.raises(LockLost) as extended:
        lock.extend()
    assert (extended.value.name, extended.value.owner, extended.value.token) == (
        "lease",
        lock.owner,
        token,
    )
    with pytest.raises(LockLost):
        lock.release()
    after = other_client.inspect("lease")
    assert [(h.owner, h.token, h.count) for h in after.holders] == [(other.owner, other.token, 1)]
    other.release()


async def test_async_unrenewed_hold_frees_at_its_ttl(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("lease", ttl=TTL, renew=False)
    started = time.monotonic()
    await lock.acquire()
    token = lock.token

    backend = aclient._session.backend  # for the store's own `waited` (the SDK drops it)
    other = await aclient._call(backend.acquire(NS, "lease", "other", ttl=5, wait=2)).aresult()
    # Never before the ttl (the store counts from its grant, after `started`) ...
    assert time.monotonic() - started >= TTL - 0.005
    # ... and promptly after it, by the store's own measure: the grant's write and its
    # way back to this client can stall on a loaded machine without the lease being late.
    assert other.waited < TTL + SLACK
    await aclient._call(backend.release(NS, "lease", "other", other.token)).aresult()
    assert token is not None and other.token > token
    assert lock.state is LockState.LOST
    with pytest.raises(LockLost):
        await lock.extend()
    with pytest.raises(LockLost):
        await lock.release()


async def test_expired_hold_extend_and_release_raise_lock_lost(backend: lockd.Backend) -> None:
    grant = await backend.acquire(NS, "lease", "a", ttl=0.2, wait=0)
    await asyncio.sleep(0.25)
    info = await backend.inspect(NS, "lease")
    assert info.holders == ()
    with pytest.raises(LockLost) as extended:
        await backend.extend(NS, "lease", "a", grant.token, 5)
    assert (extended.value.name, extended.value.owner, extended.value.token) == (
        "lease",
        "a",
        grant.token,
    )
    with pytest.raises(LockLost):
        await backend.release(NS, "lease", "a", grant.token)
    # The failed calls changed nothing: no hold came back.
    again = await backend.inspect(NS, "lease")
    assert again.holders == ()
    assert again.last_token == grant.token


async def test_crashed_holders_lease_ends_at_its_ttl(backend: lockd.Backend) -> None:
    # "a" takes the lock and is never heard from again.
    sent = time.monotonic()
    await backend.acquire(NS, "crash", "a", ttl=TTL, wait=0)
    started = time.monotonic()
    grant = await backend.acquire(NS, "crash", "b", ttl=5, wait=2)
    woke = time.monotonic()
    assert grant.owner == "b"
    # Never before the ttl: the store granted "a" after `sent` (its reply, and so
    # `started`, can come late on a loaded machine).
    assert woke - sent >= TTL - 0.005
    # "b" queued (after `started`) and was granted promptly at the lease's end, by the
    # store's own count, which the way back of the reply cannot stretch.
    assert 0 < grant.waited <= woke - started
    assert grant.waited < TTL + SLACK


def test_renewed_hold_outlives_its_ttl(client: lockd.Client, other_client: lockd.Client) -> None:
    lock = client.lock("renewed", ttl=RENEWED_TTL)
    other = other_client.lock("renewed", ttl=5)
    with lock:
        token = lock.token
        deadline = time.monotonic() + 2.5 * RENEWED_TTL
        while time.monotonic() < deadline:
            assert not other.try_acquire()
            time.sleep(0.05)
        info = client.inspect("renewed")
        assert [(h.owner, h.token) for h in info.holders] == [(lock.owner, token)]
        assert info.holders[0].held_for > 2 * RENEWED_TTL
        assert info.holders[0].ttl_left > 0
        assert lock.state is LockState.HELD
        assert not lock.lost.is_set()
    assert lock.state is LockState.RELEASED
    assert other.try_acquire()
    other.release()


async def test_renewal_goes_on_while_the_event_loop_is_blocked(
    aclient: lockd.AsyncClient,
) -> None:
    lock = aclient.lock("busy", ttl=RENEWED_TTL)
    async with lock:
        token = lock.token
        # A blocking call in the caller's loop must not starve the watchdog.
        time.sleep(2.5 * RENEWED_TTL)  # noqa: ASYNC251
        info = await aclient.inspect("busy")
        assert [(h.owner, h.token) for h in info.holders] == [(lock.owner, token)]
        assert lock.state is LockState.HELD
    assert not await lock.locked()


def test_extend_moves_the_expiry(client: lockd.Client, other_client: lockd.Client) -> None:
    lock = client.lock("extend", ttl=TTL, renew=False)
    lock.acquire()
    time.sleep(TTL * 2 / 3)
    lock.extend(1.0)
    info = client.inspect("extend")
    assert 0.9 < info.holders[0].ttl_left <= 1.0
    time.sleep(TTL * 2 / 3)  # past the original ttl
    assert not other_client.lock("extend").try_acquire()
    assert lock.state is LockState.HELD
    assert lock.owned()
    lock.release()
    assert not lock.locked()


async def test_reentrant_acquire_never_shortens_the_hold(backend: lockd.Backend) -> None:
    await backend.acquire(NS, "long", "a", ttl=5, wait=0)
    again = await backend.acquire(NS, "long", "a", ttl=0.2, wait=0)
    assert again.count == 2
    assert again.ttl > 4
    await asyncio.sleep(0.3)
    info = await backend.inspect(NS, "long")
    assert [(h.owner, h.count) for h in info.holders] == [("a", 2)]


async def test_holds_across_a_store_restart(store_url: str) -> None:
    first = await open_backend(store_url)
    try:
        grant = await first.acquire(NS, "kept", "a", ttl=0.5, wait=0)
        # A store shared across processes lives outside this backend: reopening the
        # backend does not restart it, so it keeps what it holds, like a durable one.
        durable = first.capabilities.durable or first.capabilities.shared_across_processes
    finally:
        await first.aclose()  # a stop without releasing, like a crash of the store's process
    second = await open_backend(store_url)
    try:
        info = await second.inspect(NS, "kept")
        if not durable:
            assert info.holders == ()
            return
        # A durable store keeps the hold, with no longer than its ttl left ...
        assert [(h.owner, h.token, h.count) for h in info.holders] == [("a", grant.token, 1)]
        assert 0 < info.holders[0].ttl_left <= 0.5
        # ... and still ends it at its ttl, waking the next waiter.
        waiter = asyncio.create_task(second.acquire(NS, "kept", "b", ttl=5, wait=2))
        await bqueued(second, "kept", 1)
        taken = await waiter
        assert taken.owner == "b"
        assert taken.token > grant.token
        assert taken.waited < 0.5 + SLACK  # the store's own count
    finally:
        await second.aclose()
