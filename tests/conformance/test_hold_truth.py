"""The SDK's view of a hold never runs ahead of the store's, on every store.

Nested locks with different ttls, extends shorter and longer, and renewals in flight
leave the local deadline (``lock.lease_left``) at or below the store's lease; a grant
made after an outage is live; a hold the SDK gave up on is neither adopted nor left
behind; a failed release and a pause past the ttl read truthfully; one operation
reports a loss and the next acquire starts afresh; a closed client says so.
Outages here are injected at the backend's methods; tests/faults/ cuts real stores.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import lockd
from lockd import BackendUnavailable, ClientClosed, LockLost, LockState, Revoked
from tests.conformance.helpers import wait_until

EPS = 0.02
"""What a store's own reading may lag behind ours between the two reads."""


def lease_is_truthful(client: lockd.Client, lock: lockd.Lock) -> tuple[float, float]:
    """(store's ttl left, SDK's lease left), read in that order, checked: the SDK's
    deadline lies at or before the store's expiry.

    A renewal answered while the store is read moves the SDK's deadline past a store
    reading taken before it (a RedLock inspect can take a while on a loaded machine), so
    such a reading is taken again: only one during which the deadline stood still counts.
    """
    for _ in range(20):
        hold = lock._hold()
        before = None if hold is None else hold.deadline
        holders = client.inspect(lock.name).holders
        local = lock.lease_left
        hold = lock._hold()
        if (None if hold is None else hold.deadline) == before:
            break
    assert [h.owner for h in holders] == [lock.owner]
    store = holders[0].ttl_left
    assert local <= store + EPS, f"the SDK counts on {local:.3f} s, the store has {store:.3f} s"
    return store, local


def test_a_shorter_nested_ttl_never_shortens_the_renewed_lease(client: lockd.Client) -> None:
    outer = client.lock("nest", ttl=3)
    inner = client.lock("nest", ttl=0.3)
    with outer, inner:
        assert outer.count == 2
        time.sleep(1.3)  # past the first renewal of either ttl
        store, _ = lease_is_truthful(client, outer)
        assert store > 1.5, "a renewal used the inner ttl"
    assert client.inspect("nest").holders == ()


def test_the_local_deadline_follows_every_extend(client: lockd.Client) -> None:
    lock = client.lock("extend", ttl=3)
    with lock:
        lock.extend(0.8)
        _, local = lease_is_truthful(client, lock)
        assert local <= 0.8
        lock.extend(6)
        store, local = lease_is_truthful(client, lock)
        assert local > 3 and store > 3


def test_nesting_and_unnesting_keeps_the_lease_truthful(client: lockd.Client) -> None:
    outer = client.lock("mix", ttl=0.9)
    short, long = client.lock("mix", ttl=0.3), client.lock("mix", ttl=2)
    with outer:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:  # renewals land between these steps
            with short:
                lease_is_truthful(client, outer)
                with long:
                    lease_is_truthful(client, outer)
            lease_is_truthful(client, outer)
            time.sleep(0.05)
        assert outer.state is LockState.HELD


def test_a_reentry_while_a_renewal_is_in_flight(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = client._session.backend
    real_extend = backend.extend
    started, gate = asyncio.Event(), asyncio.Event()

    async def held_up(*args: Any, **kwargs: Any) -> lockd.Grant:
        started.set()
        await gate.wait()
        return await real_extend(*args, **kwargs)

    loop = client._rt.loop
    monkeypatch.setattr(backend, "extend", held_up)
    outer = client.lock("inflight", ttl=1.2)
    with outer:
        wait_until(started.is_set, 2, "the renewal started")
        with client.lock("inflight", ttl=0.3):
            loop.call_soon_threadsafe(gate.set)
            time.sleep(0.6)
            store, _ = lease_is_truthful(client, outer)
        assert store > 0.5
        time.sleep(0.6)
        lease_is_truthful(client, outer)
        assert outer.state is LockState.HELD


def test_after_a_loss_one_operation_raises_then_acquire_starts_afresh(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("once", ttl=0.4, renew=False)
    lock.acquire()
    token = lock.token
    assert token is not None
    assert lock.lost.wait(2)
    with pytest.raises(LockLost):
        lock.acquire()
    lock.acquire(wait=2)  # no release in between: still a new hold, not the old loss
    assert (lock.state, lock.count) == (LockState.HELD, 1)
    assert lock.token is not None and lock.token > token
    lock.release()
    assert other_client.lock("once", ttl=1).try_acquire()


def test_nested_exits_each_report_the_loss(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("nested-loss", ttl=5)

    def nested() -> None:
        with lock:
            try:
                with lock:
                    other_client.force_release("nested-loss")
                    wait_until(lambda: lock.state is LockState.REVOKED, 3, "revoked")
            except Revoked:
                pass
            else:
                raise AssertionError("the inner exit did not report the revocation")

    with pytest.raises(Revoked):
        nested()  # the outer exit reports it too: its body ran partly unprotected
    assert lock.try_acquire()
    lock.release()


def test_a_body_error_wins_over_the_loss_and_carries_it(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("body", ttl=5)

    def body_fails() -> None:
        with lock:
            other_client.force_release("body")
            wait_until(lambda: lock.state is LockState.REVOKED, 3, "revoked")
            raise KeyError("the body's own error")

    with pytest.raises(KeyError) as caught:
        body_fails()
    assert any("Revoked" in note for note in getattr(caught.value, "__notes__", []))
    assert lock.state is LockState.REVOKED
    assert lock.try_acquire()
    lock.release()


async def test_async_body_error_wins_over_the_loss(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("abody", ttl=5)

    async def body_fails() -> None:
        async with lock:
            await aclient.force_release("abody")
            for _ in range(300):
                if lock.state is LockState.REVOKED:
                    break
                await asyncio.sleep(0.01)
            raise KeyError("the body's own error")

    with pytest.raises(KeyError) as caught:
        await body_fails()
    assert any("Revoked" in note for note in getattr(caught.value, "__notes__", []))


def test_a_pause_past_the_deadline_reads_lost_at_once(client: lockd.Client) -> None:
    lock = client.lock("paused", ttl=0.5)
    lock.acquire()
    hold = lock._hold()
    assert hold is not None
    hold.deadline = time.monotonic() - 0.01  # as after a pause longer than the ttl
    assert lock.state is LockState.LOST
    assert lock.lease_left == 0.0


def test_a_release_that_cannot_reach_the_store_ends_the_hold_truthfully(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = client._session.backend

    async def unreachable(*args: object, **kwargs: object) -> int:
        raise BackendUnavailable("injected: the store cannot be reached")

    lock = client.lock("unreleased", ttl=0.6)
    lock.acquire()
    monkeypatch.setattr(backend, "direct", None)
    monkeypatch.setattr(backend, "release", unreachable)
    with pytest.raises(BackendUnavailable):
        lock.release()
    assert lock.state is LockState.LOST
    assert lock.lost.is_set()
    monkeypatch.undo()
    # Nothing renews it: the store frees it by its ttl (or the SDK's drain frees it sooner).
    with other_client.lock("unreleased", ttl=1).acquire(wait=2) as other:
        assert other.owned()
    assert lock.try_acquire()  # the loss was reported by the release: a new hold
    assert lock.state is LockState.HELD
    lock.release()


def test_a_grant_after_an_outage_is_live_and_the_old_hold_is_not_adopted(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = client._session.backend
    real_acquire = backend.acquire
    outage_until = [0.0]

    async def cut(*args: object, **kwargs: object) -> lockd.Grant:
        raise BackendUnavailable("injected: the store cannot be reached")

    async def acquire_after_outage(*args: Any, **kwargs: Any) -> lockd.Grant:
        if time.monotonic() < outage_until[0]:
            raise BackendUnavailable("injected: the store cannot be reached")
        return await real_acquire(*args, **kwargs)

    ttl = 0.6
    lock = client.lock("outage", ttl=ttl)
    lock.acquire()
    old = lock.token
    assert old is not None
    monkeypatch.setattr(backend, "extend", cut)
    assert lock.lost.wait(3)
    monkeypatch.undo()
    # The store comes back for everything but acquires only after more than a ttl, so
    # the acquire below starts before the outage ends and is granted after it.
    outage_until[0] = time.monotonic() + ttl * 1.5
    monkeypatch.setattr(backend, "direct", None)
    monkeypatch.setattr(backend, "acquire", acquire_after_outage)
    with pytest.raises(LockLost):
        lock.release()
    fresh = client.lock("outage", ttl=ttl)
    fresh.acquire(wait=5)
    assert (fresh.state, fresh.count) == (LockState.HELD, 1)
    assert fresh.token is not None and fresh.token > old
    time.sleep(ttl * 1.5)  # renewed, not lost on arrival
    assert fresh.state is LockState.HELD
    holders = other_client.inspect("outage").holders
    assert [(h.token, h.count) for h in holders] == [(fresh.token, 1)]
    fresh.release()
    assert other_client.lock("outage", ttl=1).try_acquire()


def test_a_hold_given_up_on_is_released_at_the_store(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewals fail while the store still has the hold (an answer lost on the way back):
    once the SDK calls it lost, it releases it, so the same owner starts afresh."""
    backend = client._session.backend
    real_extend = backend.extend

    async def reply_lost(*args: Any, **kwargs: Any) -> lockd.Grant:
        await real_extend(*args, **kwargs)  # applied by the store, the answer lost
        raise BackendUnavailable("injected: the answer was lost")

    lock = client.lock("orphan", ttl=0.6, owner="job")
    lock.acquire()
    old = lock.token
    monkeypatch.setattr(backend, "extend", reply_lost)
    assert lock.lost.wait(3)
    monkeypatch.undo()
    wait_until(lambda: other_client.inspect("orphan").holders == (), 2, "the store let go")
    with pytest.raises(LockLost):
        lock.acquire()
    lock.acquire(wait=1)
    assert lock.count == 1 and lock.token is not None and old is not None and lock.token > old
    lock.release()
    assert other_client.inspect("orphan").holders == ()


def test_a_closed_client_says_so(store_url: str) -> None:
    client = lockd.Client(store_url)
    lock = client.lock("closed", ttl=1)
    client.close()
    started = time.monotonic()
    for call in (lock.acquire, lock.try_acquire, lock.release, lock.extend, lock.owned):
        with pytest.raises(ClientClosed):
            call()
    with pytest.raises(ClientClosed):
        client.inspect("closed")
    assert time.monotonic() - started < 1


async def test_a_closed_async_client_says_so(store_url: str) -> None:
    client = lockd.AsyncClient(store_url)
    lock = client.lock("closed", ttl=1)
    await client.aclose()
    with pytest.raises(ClientClosed):
        await lock.acquire()
    with pytest.raises(ClientClosed):
        await client.list_locks()
