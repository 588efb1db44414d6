"""Contract item 12: every acquire and release carries a request id, and a retried
request is applied once: a lost reply never double-counts a reentrant hold or leaks a
grant.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import lockd
from lockd import AcquireTimeout, BackendUnavailable, LockLost
from tests.conformance.helpers import NS, bqueued, open_backend, wait_until


async def test_retried_acquire_is_applied_once(backend: lockd.Backend) -> None:
    first = await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-1")
    again = await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-1")
    assert (again.token, again.count) == (first.token, 1)
    info = await backend.inspect(NS, "retry")
    assert [(h.owner, h.count) for h in info.holders] == [("a", 1)]
    # One release ends it: the retry did not count as a re-entry.
    assert await backend.release(NS, "retry", "a", first.token, request_id="rel-1") == 0
    assert (await backend.inspect(NS, "retry")).holders == ()


async def test_retried_release_is_applied_once(backend: lockd.Backend) -> None:
    grant = await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-1")
    await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-2")
    assert await backend.release(NS, "retry", "a", grant.token, request_id="rel-1") == 1
    assert await backend.release(NS, "retry", "a", grant.token, request_id="rel-1") == 1
    info = await backend.inspect(NS, "retry")
    assert [(h.owner, h.count) for h in info.holders] == [("a", 1)]
    assert await backend.release(NS, "retry", "a", grant.token, request_id="rel-2") == 0
    assert (await backend.inspect(NS, "retry")).holders == ()


async def test_request_ids_are_per_owner(backend: lockd.Backend) -> None:
    await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="same")
    # The same id from another owner is another request: it is not answered a's grant.
    with pytest.raises(AcquireTimeout):
        await backend.acquire(NS, "retry", "b", ttl=5, wait=0, request_id="same")
    assert [h.owner for h in (await backend.inspect(NS, "retry")).holders] == ["a"]


async def test_retry_of_an_ended_grant_is_not_granted_again(backend: lockd.Backend) -> None:
    grant = await backend.acquire(NS, "retry", "a", ttl=0.2, wait=0, request_id="req-1")
    await asyncio.sleep(0.25)
    with pytest.raises(LockLost) as lost:
        await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-1")
    assert lost.value.token == grant.token
    assert (await backend.inspect(NS, "retry")).holders == ()
    # After a release, too.
    grant = await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-2")
    await backend.release(NS, "retry", "a", grant.token)
    with pytest.raises(LockLost):
        await backend.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-2")
    assert (await backend.inspect(NS, "retry")).holders == ()


async def test_retry_of_a_queued_acquire_keeps_its_place(backend: lockd.Backend) -> None:
    held = await backend.acquire(NS, "retry", "a", ttl=5, wait=0)
    original = asyncio.create_task(
        backend.acquire(NS, "retry", "b", ttl=5, wait=5, request_id="req-b")
    )
    await bqueued(backend, "retry", 1)
    behind = asyncio.create_task(backend.acquire(NS, "retry", "c", ttl=5, wait=5))
    await bqueued(backend, "retry", 2)
    retry = asyncio.create_task(
        backend.acquire(NS, "retry", "b", ttl=5, wait=5, request_id="req-b")
    )
    with pytest.raises(AcquireTimeout):
        await asyncio.wait_for(original, 1)  # the retry took over
    info = await backend.inspect(NS, "retry")
    assert [w.owner for w in info.waiters] == ["b", "c"]
    await backend.release(NS, "retry", "a", held.token)
    grant = await retry
    assert (grant.owner, grant.count) == ("b", 1)
    assert not behind.done()
    await backend.release(NS, "retry", "b", grant.token)
    assert (await behind).owner == "c"


async def test_retries_are_remembered_across_a_restart(store_url: str) -> None:
    first = await open_backend(store_url)
    try:
        grant = await first.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-1")
        durable = first.capabilities.durable
    finally:
        await first.aclose()
    second = await open_backend(store_url)
    try:
        again = await second.acquire(NS, "retry", "a", ttl=5, wait=0, request_id="req-1")
        if durable:
            assert (again.token, again.count) == (grant.token, 1)
        else:
            assert again.count == 1  # a fresh store: a fresh grant
        info = await second.inspect(NS, "retry")
        assert [(h.owner, h.count) for h in info.holders] == [("a", 1)]
    finally:
        await second.aclose()


def _lose_first_reply(
    monkeypatch: pytest.MonkeyPatch, backend: lockd.Backend, method: str
) -> list[str | None]:
    """Make the store apply the first call of ``method`` and then "lose" its reply."""
    real = getattr(backend, method)
    seen: list[str | None] = []

    async def lossy(*args: object, **kwargs: object) -> object:
        result = await real(*args, **kwargs)
        request_id = kwargs.get("request_id", args[4] if len(args) > 4 else None)
        seen.append(request_id if isinstance(request_id, str) else None)
        if len(seen) == 1:
            raise BackendUnavailable("injected: the reply was lost")
        return result

    monkeypatch.setattr(backend, method, lossy)
    return seen


def test_lost_release_reply_does_not_double_count(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = client.lock("lossy", ttl=5)
    lock.acquire()
    lock.acquire()
    assert lock.count == 2
    seen = _lose_first_reply(monkeypatch, client._session.backend, "release")
    lock.release()  # the SDK retries with the same request id
    monkeypatch.undo()
    assert len(seen) >= 2
    assert len(set(seen)) == 1
    assert seen[0] is not None
    info = client.inspect("lossy")
    assert [(h.owner, h.count) for h in info.holders] == [(lock.owner, 1)]
    assert lock.count == 1
    lock.release()
    assert client.inspect("lossy").holders == ()


def _store_count(client: lockd.Client, name: str) -> int:
    holders = client.inspect(name).holders
    return holders[0].count if holders else 0


def test_lost_acquire_reply_does_not_leak_a_grant(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = client.lock("lossy", ttl=5)
    _lose_first_reply(monkeypatch, client._session.backend, "acquire")
    try:
        lock.acquire()
        granted = True
    except BackendUnavailable:
        granted = False
    monkeypatch.undo()
    if granted:
        # Retried with the same request id: one grant, counted once.
        assert lock.count == 1
        assert _store_count(client, "lossy") == 1
        lock.release()
    # Either way the store must agree with the SDK: no hold the caller does not know of.
    wait_until(lambda: _store_count(client, "lossy") == 0, timeout=1, what="no leaked hold")


def test_lost_reentrant_acquire_reply_does_not_double_count(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = client.lock("lossy", ttl=5)
    lock.acquire()
    _lose_first_reply(monkeypatch, client._session.backend, "acquire")
    try:
        lock.acquire()
        expected = 2
    except BackendUnavailable:
        expected = 1
    monkeypatch.undo()
    assert lock.count == expected
    deadline = time.monotonic() + 1
    while _store_count(client, "lossy") != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _store_count(client, "lossy") == expected
    for _ in range(expected):
        lock.release()
    assert client.inspect("lossy").holders == ()


async def test_abandon_a_queued_acquire_leaves_the_queue(backend: lockd.Backend) -> None:
    held = await backend.acquire(NS, "gone", "a", ttl=5, wait=0)
    waiting = asyncio.create_task(
        backend.acquire(NS, "gone", "b", ttl=5, wait=5, request_id="req-b")
    )
    await bqueued(backend, "gone", 1)
    await backend.abandon(NS, "gone", "b", "req-b")
    assert (await backend.inspect(NS, "gone")).waiters == ()
    with pytest.raises(AcquireTimeout):
        await asyncio.wait_for(waiting, 2)
    await backend.release(NS, "gone", "a", held.token)
    assert (await backend.inspect(NS, "gone")).holders == ()


async def test_abandon_a_granted_acquire_releases_it_once(backend: lockd.Backend) -> None:
    grant = await backend.acquire(NS, "gone", "a", ttl=5, wait=0, request_id="req-1")
    again = await backend.acquire(NS, "gone", "a", ttl=5, wait=0)  # count 2: a real re-entry
    assert again.count == 2
    await backend.abandon(NS, "gone", "a", "req-1")
    await backend.abandon(NS, "gone", "a", "req-1")  # twice: applied once
    info = await backend.inspect(NS, "gone")
    assert [(h.owner, h.token, h.count) for h in info.holders] == [("a", grant.token, 1)]


async def test_abandon_before_the_acquire_arrives_refuses_it(backend: lockd.Backend) -> None:
    await backend.abandon(NS, "gone", "a", "req-late")
    with pytest.raises(AcquireTimeout):
        await backend.acquire(NS, "gone", "a", ttl=5, wait=0, request_id="req-late")
    assert (await backend.inspect(NS, "gone")).holders == ()
    # Another request of the same owner is not affected.
    assert (await backend.acquire(NS, "gone", "a", ttl=5, wait=0, request_id="req-2")).count == 1


async def test_abandon_needs_a_request_id(backend: lockd.Backend) -> None:
    with pytest.raises(lockd.InvalidRequest):
        await backend.abandon(NS, "gone", "a", "")
