"""The SDK's session under the races and failures a review found, on every store.

Each test replays one interleaving deterministically: a renewal held at a gate, an
answer the store applied but the caller never heard, a waiter kept across a failed call,
a drain racing the same owner in another client, a client closed under a queued acquire.
Faults are injected into one session's view of the store (:class:`Faulty`), so other
clients of the same store in this process see the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

import lockd
from lockd import BackendUnavailable, ClientClosed, LockState
from lockd.backends.base import AcquireRequest
from tests.conformance.helpers import queued, start, wait_until
from tests.conformance.test_hold_truth import lease_is_truthful


class Faulty:
    """One session's view of a shared backend, with some of its methods replaced."""

    def __init__(self, real: lockd.Backend, **replaced: Any) -> None:
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def inject(monkeypatch: pytest.MonkeyPatch, client: lockd.Client, **replaced: Any) -> lockd.Backend:
    """Give ``client``'s session a :class:`Faulty` view; returns the real backend."""
    real = client._session.backend
    monkeypatch.setattr(client._session, "backend", Faulty(real, **replaced))
    return real


def applied_then_lost(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, applied by the store, whose answer never comes back."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise BackendUnavailable("injected: the answer was lost")

    return call


def test_an_extend_applied_but_unanswered_never_leaves_the_deadline_ahead(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = client.lock("unheard-extend", ttl=3)
    with lock:
        real = inject(monkeypatch, client)
        monkeypatch.setattr(client._session.backend, "extend", applied_then_lost(real.extend))
        with pytest.raises(BackendUnavailable):
            lock.extend(0.5)  # the store now ends the hold 0.5 s from now
        lease_is_truthful(client, lock)
        monkeypatch.undo()
        time.sleep(0.7)  # past the shortened lease: the watchdog must have renewed it
        assert lock.state is LockState.HELD
        store, _ = lease_is_truthful(client, lock)
        assert store > 1


def test_a_renewal_sent_before_a_longer_reentry_does_not_lose_the_hold(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal in flight carries the outer ttl; applied after the re-entry, it
    shortens the store's lease to that ttl, and the next renewal must come in time."""
    loop = client._rt.loop
    started, gate = asyncio.Event(), asyncio.Event()
    real = client._session.backend

    async def held_up(*args: Any, **kwargs: Any) -> lockd.Grant:
        if not gate.is_set():
            started.set()
            await gate.wait()
        return await real.extend(*args, **kwargs)

    inject(monkeypatch, client, extend=held_up)
    outer = client.lock("longer", ttl=0.6)
    with outer:
        wait_until(started.is_set, 2, "the renewal started")
        with client.lock("longer", ttl=3):
            loop.call_soon_threadsafe(gate.set)
            end = time.monotonic() + 1.2  # twice the outer ttl
            while time.monotonic() < end:
                lease_is_truthful(client, outer)
                time.sleep(0.05)
            assert outer.state is LockState.HELD, outer._hold()
            assert outer.count == 2


def test_a_drain_takes_back_only_its_own_counts_of_a_shared_owner(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two clients hold as one explicit owner (one hold, count 2 at the store). One of
    them gives its count up, and the answer to its release is lost: the retry must not
    take the other's count too."""
    mine = client.lock("shared", ttl=0.6, owner="job")
    theirs = other_client.lock("shared", ttl=3, owner="job")
    mine.acquire()
    theirs.acquire()
    assert [h.count for h in other_client.inspect("shared").holders] == [2]
    real = client._session.backend
    unheard: list[int] = []

    async def cut(*args: Any, **kwargs: Any) -> lockd.Grant:
        raise BackendUnavailable("injected: the store cannot be reached")

    async def release(*args: Any, **kwargs: Any) -> int:
        left: int = await real.release(*args, **kwargs)
        if not unheard:
            unheard.append(left)
            raise BackendUnavailable("injected: the answer was lost")
        return left

    inject(monkeypatch, client, extend=cut, release=release, direct=None)
    assert mine.lost.wait(3)
    wait_until(lambda: bool(unheard) and not client._session._cleanups, 3, "the drain ended")
    holders = other_client.inspect("shared").holders
    assert [(h.owner, h.count) for h in holders] == [("job", 1)]
    assert theirs.state is LockState.HELD
    theirs.release()
    assert other_client.inspect("shared").holders == ()


def test_a_queued_acquire_ends_with_the_client_and_holds_nothing(
    client: lockd.Client, store_url: str
) -> None:
    """Closing ends an acquire queued on the loop at once; one waiting in the caller's
    own thread (redis's direct path) ends when its wait does. Either raises ClientClosed."""
    closing = lockd.Client(store_url)
    holder = client.lock("closing", ttl=5)
    holder.acquire()
    try:
        waiting = start(lambda: closing.lock("closing", ttl=1).acquire(wait=1))
        queued(client, "closing", 1)
    finally:
        closing.close()
    with pytest.raises(ClientClosed):
        waiting.outcome(3)
    wait_until(lambda: client.inspect("closing").waiters == (), 1, "the waiter left")
    holder.release()
    wait_until(lambda: client.inspect("closing").holders == (), 2, "nobody holds")


def test_a_grant_after_close_is_given_back(client: lockd.Client, store_url: str) -> None:
    """A sync caller's queued acquire (its own thread on redis) granted after close."""
    closing = lockd.Client(store_url)
    holder = client.lock("granted-late", ttl=5)
    holder.acquire()
    try:
        waiting = start(lambda: closing.lock("granted-late", ttl=1).acquire(wait=5))
        queued(client, "granted-late", 1)
        closing._session.closed = True  # closing begins: the grant below arrives meanwhile
        holder.release()
        with pytest.raises(ClientClosed):
            waiting.outcome()
        wait_until(lambda: client.inspect("granted-late").holders == (), 2, "given back")
    finally:
        closing.close()


def test_a_retried_wait_counts_its_lease_from_no_earlier_than_the_retry(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued acquire whose call fails stays queued at a store that keeps waiters
    across calls (redis: a waiter lease); the retry takes over its place, and the
    grant's ``waited`` counts from the first call's arrival, before the retry was sent."""
    real = client._session.backend
    step = getattr(real, "_step", None)
    if step is None or not hasattr(real, "new_attempt"):
        pytest.skip("this store keeps no waiter across a failed call")
    holder = other_client.lock("retried", ttl=5)
    holder.acquire()
    calls: list[float] = []

    async def queued_then_cut(namespace: str, name: str, owner: str, **kw: Any) -> lockd.Grant:
        calls.append(time.monotonic())
        if len(calls) > 1:
            return await real.acquire(namespace, name, owner, **kw)
        req = AcquireRequest(namespace, name, owner, kw["ttl"], kw["wait"], kw.get("limit", 1),
                             kw["request_id"])  # fmt: skip
        await step(req, kw["request_id"], real.new_attempt(), "new")  # queued, then:
        await asyncio.sleep(0.6)
        raise BackendUnavailable("injected: the connection broke while queued")

    inject(monkeypatch, client, acquire=queued_then_cut, direct=None)
    lock = client.lock("retried", ttl=3, owner="retrier")
    waiting = start(lambda: lock.acquire(wait=5))
    wait_until(lambda: len(calls) > 1, 3, "the retry was sent")
    queued(other_client, "retried", 1)
    time.sleep(0.1)
    holder.release()
    waiting.outcome()
    lease_is_truthful(other_client, lock)
    lock.release()


def test_an_extend_answered_after_the_release_does_not_revive_the_hold(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads hold as one owner; one extends (applied, its answer held back), the
    other releases the last count meanwhile: the released hold stays released, with no
    renewal and no false loss afterwards."""
    loop = client._rt.loop
    applied, gate = asyncio.Event(), asyncio.Event()
    real = client._session.backend

    async def answer_held_back(*args: Any, **kwargs: Any) -> lockd.Grant:
        grant: lockd.Grant = await real.extend(*args, **kwargs)
        applied.set()
        await gate.wait()
        return grant

    inject(monkeypatch, client, extend=answer_held_back)
    losses: list[BaseException] = []
    lock = client.lock("revived", ttl=0.6, owner="two-threads", on_lost=losses.append)
    lock.acquire()
    extending = start(lambda: lock.extend(3))
    wait_until(applied.is_set, 2, "the extend was applied")
    start(lock.release).outcome()
    loop.call_soon_threadsafe(gate.set)
    extending.outcome()
    time.sleep(1.2)  # two renewal intervals of the ttl extended to
    assert lock.state is LockState.RELEASED
    assert losses == []
    assert client.inspect("revived").holders == ()


async def test_reading_async_lost_does_not_pile_up_listeners(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("listeners", ttl=5)
    await lock.acquire()
    events = [lock.lost for _ in range(100)]
    hold = lock._hold()
    assert hold is not None
    assert len(hold.listeners) <= 1
    await aclient.force_release("listeners")
    await asyncio.wait_for(events[0].wait(), 3)
    assert all(event.is_set() for event in events)
    with pytest.raises(lockd.Revoked):
        await lock.release()


def test_a_client_gives_back_only_the_counts_it_took_of_a_shared_owner(
    client: lockd.Client, other_client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other client holds first, this one re-enters as the same owner (count 2 at
    the store), then gives its hold up: one count goes, the other client keeps its own."""
    theirs = other_client.lock("shared-first", ttl=3, owner="job")
    mine = client.lock("shared-first", ttl=0.6, owner="job")
    theirs.acquire()
    mine.acquire()
    assert [h.count for h in other_client.inspect("shared-first").holders] == [2]

    async def cut(*args: Any, **kwargs: Any) -> lockd.Grant:
        raise BackendUnavailable("injected: the store cannot be reached")

    inject(monkeypatch, client, extend=cut)
    assert mine.lost.wait(3)
    wait_until(lambda: not client._session._cleanups, 3, "the drain ended")
    holders = other_client.inspect("shared-first").holders
    assert [(h.owner, h.count) for h in holders] == [("job", 1)]
    theirs.release()


def test_every_call_after_close_raises_client_closed(store_url: str) -> None:
    client = lockd.Client(store_url)
    lock, semaphore = client.lock("shut", ttl=1), client.semaphore("shut-n", 2, ttl=1)
    held = client.lock("held-at-close", ttl=1)
    held.acquire()
    client.close()
    started = time.monotonic()
    for target in (lock, semaphore, held):
        for call in (target.acquire, target.try_acquire, target.release, target.extend,
                     target.owned, target.locked, target.__enter__):  # fmt: skip
            with pytest.raises(ClientClosed):
                call()
    for other in (client.list_locks, lambda: client.inspect("shut"),
                  lambda: client.force_release("shut")):  # fmt: skip
        with pytest.raises(ClientClosed):
            other()
    assert time.monotonic() - started < 1
    assert held.state is LockState.RELEASED


async def test_every_async_call_after_close_raises_client_closed(store_url: str) -> None:
    client = lockd.AsyncClient(store_url)
    lock, semaphore = client.lock("shut", ttl=1), client.semaphore("shut-n", 2, ttl=1)
    await client.aclose()
    started = time.monotonic()
    for target in (lock, semaphore):
        for call in (target.acquire, target.try_acquire, target.release, target.extend,
                     target.owned, target.locked, target.__aenter__):  # fmt: skip
            with pytest.raises(ClientClosed):
                await call()
    for other in (client.list_locks, lambda: client.inspect("shut"),
                  lambda: client.force_release("shut")):  # fmt: skip
        with pytest.raises(ClientClosed):
            await other()
    assert time.monotonic() - started < 1


def test_a_reentry_answered_after_a_shorter_renewal_was_applied(
    client: lockd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-entry with a longer ttl is applied, its answer held back; a renewal with the
    outer ttl is applied after it (the store's lease shrinks to that ttl) and answered
    first: the re-entry's late answer must not lengthen the local deadline again."""
    loop = client._rt.loop
    applied, gate = asyncio.Event(), asyncio.Event()
    real = client._session.backend
    renewed: list[float] = []

    async def reentry_answer_held_back(*args: Any, **kwargs: Any) -> lockd.Grant:
        grant: lockd.Grant = await real.acquire(*args, **kwargs)
        applied.set()
        await gate.wait()
        return grant

    async def extend(*args: Any, **kwargs: Any) -> lockd.Grant:
        grant: lockd.Grant = await real.extend(*args, **kwargs)
        renewed.append(time.monotonic())
        return grant

    outer = client.lock("reordered", ttl=0.6, owner="one")
    outer.acquire()
    inject(monkeypatch, client, acquire=reentry_answer_held_back, extend=extend)
    inner = start(lambda: client.lock("reordered", ttl=3, owner="one").acquire())
    wait_until(applied.is_set, 2, "the re-entry was applied")
    wait_until(lambda: bool(renewed), 2, "a renewal (ttl 0.6) was applied after it")
    loop.call_soon_threadsafe(gate.set)
    inner.outcome()
    lease_is_truthful(client, outer)
