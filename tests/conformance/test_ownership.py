"""Contract item 8: only the holder can release or extend; anyone else gets a clear error
and nothing changes. An administrator's force-release revokes the hold: the evicted
owner's next extend or release raises ``Revoked``, the lock says ``revoked``, its
``lost`` event is set, ``on_lost`` is called, and the next grant gets a higher token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest

import lockd
from lockd import LockLost, LockState, NotHeld, Revoked
from tests.conformance.conftest import IO_THREAD
from tests.conformance.helpers import NS, await_until, open_backend, snapshot


def test_stranger_cannot_release_or_extend(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    lock = client.lock("mine", ttl=5)
    lock.acquire()
    before = snapshot(client.inspect("mine"))
    stranger = other_client.lock("mine", ttl=5)
    with pytest.raises(NotHeld) as released:
        stranger.release()
    assert type(released.value) is NotHeld
    assert (released.value.name, released.value.owner) == ("mine", stranger.owner)
    assert "does not hold" in str(released.value)
    with pytest.raises(NotHeld) as extended:
        stranger.extend(1)
    assert type(extended.value) is NotHeld
    assert snapshot(client.inspect("mine")) == before
    assert client.inspect("mine").holders[0].ttl_left > 2  # the stranger's extend(1) did not apply
    assert lock.state is LockState.HELD
    lock.release()
    assert not lock.locked()


async def test_async_stranger_cannot_release_or_extend(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("mine", ttl=5)
    await lock.acquire()
    before = snapshot(await aclient.inspect("mine"))

    async def stranger() -> None:
        with pytest.raises(NotHeld):
            await lock.release()
        with pytest.raises(NotHeld):
            await lock.extend(1)

    await asyncio.create_task(stranger())
    assert snapshot(await aclient.inspect("mine")) == before
    await lock.release()


async def test_backend_refuses_strangers_and_stale_tokens(backend: lockd.Backend) -> None:
    old = await backend.acquire(NS, "mine", "a", ttl=5, wait=0)
    await backend.release(NS, "mine", "a", old.token)
    held = await backend.acquire(NS, "mine", "a", ttl=5, wait=0)
    before = snapshot(await backend.inspect(NS, "mine"))
    with pytest.raises(NotHeld):
        await backend.release(NS, "mine", "b", None)
    with pytest.raises(NotHeld):
        await backend.extend(NS, "mine", "b", None, 1)
    # The owner itself, with the token of a hold that already ended: that hold is lost.
    with pytest.raises(LockLost):
        await backend.release(NS, "mine", "a", old.token)
    with pytest.raises(LockLost):
        await backend.extend(NS, "mine", "a", old.token, 1)
    # A token never issued for this name.
    with pytest.raises(NotHeld):
        await backend.release(NS, "mine", "a", held.token + 100)
    assert snapshot(await backend.inspect(NS, "mine")) == before


async def test_stranger_with_the_holders_token_is_not_told_the_hold_ended(
    backend: lockd.Backend,
) -> None:
    held = await backend.acquire(NS, "mine", "a", ttl=5, wait=0)
    before = snapshot(await backend.inspect(NS, "mine"))
    with pytest.raises(NotHeld) as released:
        await backend.release(NS, "mine", "b", held.token)
    # The hold is alive: "lost" (the hold has ended) would be false.
    assert not isinstance(released.value, LockLost | Revoked)
    with pytest.raises(NotHeld) as extended:
        await backend.extend(NS, "mine", "b", held.token, 1)
    assert not isinstance(extended.value, LockLost | Revoked)
    assert snapshot(await backend.inspect(NS, "mine")) == before


def _is_set(event: threading.Event) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return event.is_set()

    return check


class Called:
    """Records on_lost calls: the error, the thread and (if any) the running loop."""

    def __init__(self) -> None:
        self.errors: list[NotHeld] = []
        self.threads: list[threading.Thread] = []
        self.loops: list[asyncio.AbstractEventLoop | None] = []
        self.event = threading.Event()

    def __call__(self, error: NotHeld) -> None:
        self.errors.append(error)
        self.threads.append(threading.current_thread())
        try:
            self.loops.append(asyncio.get_running_loop())
        except RuntimeError:
            self.loops.append(None)
        self.event.set()


def test_force_release_revokes_the_hold(client: lockd.Client, other_client: lockd.Client) -> None:
    called = Called()
    lock = client.lock("admin", ttl=5, renew=False, on_lost=called)
    lock.acquire()
    token = lock.token
    assert token is not None
    evicted = other_client.force_release("admin")
    assert [(h.owner, h.token, h.count) for h in evicted] == [(lock.owner, token, 1)]
    info = other_client.inspect("admin")
    assert info.holders == ()
    assert info.last_token == token

    with pytest.raises(Revoked) as extended:
        lock.extend()
    assert (extended.value.name, extended.value.owner, extended.value.token) == (
        "admin",
        lock.owner,
        token,
    )
    assert lock.state is LockState.REVOKED
    assert lock.lost.is_set()
    assert called.event.wait(2)
    assert isinstance(called.errors[0], Revoked)
    # The sync callback runs in a thread of its own: neither the caller's nor the I/O loop's.
    assert called.threads[0] is not threading.main_thread()
    assert called.threads[0].name != IO_THREAD
    with pytest.raises(Revoked):
        lock.release()
    assert other_client.inspect("admin").holders == ()

    with other_client.lock("admin", ttl=5) as other:
        assert other.token is not None and other.token > token


def test_release_after_force_release_raises_revoked_and_keeps_the_state(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    called = Called()
    lock = client.lock("admin", ttl=5, renew=False, on_lost=called)
    lock.acquire()
    lost = lock.lost
    other_client.force_release("admin")
    with pytest.raises(Revoked):
        lock.release()
    assert lost.is_set()
    assert called.event.wait(2)
    assert isinstance(called.errors[0], Revoked)
    # The lock says what happened to it, also after the failed release (see README:
    # `if lock.state is LockState.LOST` after the `with` block).
    assert lock.state is LockState.REVOKED
    assert lock.lost.is_set()


async def test_async_force_release_revokes_the_hold(aclient: lockd.AsyncClient) -> None:
    called = Called()
    lock = aclient.lock("admin", ttl=5, renew=False, on_lost=called)
    await lock.acquire()
    lost = lock.lost
    token = lock.token
    evicted = await aclient.force_release("admin")
    assert [h.token for h in evicted] == [token]
    with pytest.raises(Revoked) as extended:
        await lock.extend()
    assert extended.value.token == token
    assert lock.state is LockState.REVOKED
    await asyncio.wait_for(lost.wait(), 1)
    await await_until(_is_set(called.event), what="on_lost was called")
    assert isinstance(called.errors[0], Revoked)
    # The async callback runs in the loop that acquired.
    assert called.loops[0] is asyncio.get_running_loop()
    with pytest.raises(Revoked):
        await lock.release()
    other = aclient.lock("admin", ttl=5)
    async with other:
        assert other.token is not None and token is not None and other.token > token


async def test_async_on_lost_may_be_a_coroutine(aclient: lockd.AsyncClient) -> None:
    seen: asyncio.Queue[NotHeld] = asyncio.Queue()

    async def on_lost(error: NotHeld) -> None:
        await asyncio.sleep(0)
        seen.put_nowait(error)

    lock = aclient.lock("admin", ttl=5, renew=False, on_lost=on_lost)
    await lock.acquire()
    await aclient.force_release("admin")
    with pytest.raises(Revoked):
        await lock.extend()
    error = await asyncio.wait_for(seen.get(), 1)
    assert isinstance(error, Revoked)
    assert error.name == "admin"


def test_force_release_of_a_free_name_changes_nothing(client: lockd.Client) -> None:
    before = snapshot(client.inspect("free"))
    assert client.force_release("free") == []
    assert snapshot(client.inspect("free")) == before


async def test_revocation_is_recorded(store_url: str) -> None:
    backend = await open_backend(store_url)
    try:
        held = await backend.acquire(NS, "rec", "a", ttl=5, wait=0)
        await backend.force_release(NS, "rec")
        # Later grants do not erase the record: the evicted token stays revoked.
        for owner in ("b", "c"):
            grant = await backend.acquire(NS, "rec", owner, ttl=5, wait=0)
            await backend.release(NS, "rec", owner, grant.token)
        with pytest.raises(Revoked):
            await backend.release(NS, "rec", "a", held.token)
        durable = backend.capabilities.durable
    finally:
        await backend.aclose()
    if not durable:
        return
    restarted = await open_backend(store_url)
    try:
        with pytest.raises(Revoked):
            await restarted.extend(NS, "rec", "a", held.token, 5)
    finally:
        await restarted.aclose()
