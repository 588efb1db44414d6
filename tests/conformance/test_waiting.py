"""Contract items 6, 7 and 12 (cancellation): a blocked acquire wakes within about a
round trip of the release, expiry or force-release that frees it (no polling); a waiter
that gives up leaves the queue at once and never holds up those behind it; a cancelled
acquire that was granted meanwhile gives the grant back.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import pytest

import lockd
from lockd import AcquireTimeout, LockLost
from tests.conformance.helpers import (
    NS,
    SLACK,
    WAKE_BOUND,
    aqueued,
    await_until,
    bqueued,
    queued,
    snapshot,
    start,
)

ROUNDS = 5


def test_release_wakes_the_waiter_without_polling(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    holder = client.lock("wake", ttl=5)
    waiter = other_client.lock("wake", ttl=5)
    # Several rounds: a poller with a 1 s interval might pass one by luck, not the median
    # of five; a single slow disk write cannot fail the median either.
    delays: list[float] = []
    for _ in range(ROUNDS):
        holder.acquire()

        def wait_for_it() -> float:
            waiter.acquire(wait=5)
            woke = time.monotonic()
            waiter.release()
            return woke

        worker = start(wait_for_it)
        queued(client, "wake", 1)
        released = time.monotonic()
        holder.release()
        woke = worker.outcome()
        assert woke is not None
        delays.append(woke - released)
    assert statistics.median(delays) < WAKE_BOUND, delays


async def test_async_release_wakes_the_waiter_without_polling(
    aclient: lockd.AsyncClient,
) -> None:
    lock = aclient.lock("wake", ttl=5)
    delays: list[float] = []
    for _ in range(ROUNDS):
        await lock.acquire()

        async def wait_for_it() -> float:
            await lock.acquire(wait=5)
            woke = time.monotonic()
            await lock.release()
            return woke

        task = asyncio.create_task(wait_for_it())
        await aqueued(aclient, "wake", 1)
        released = time.monotonic()
        await lock.release()
        delays.append(await task - released)
    assert statistics.median(delays) < WAKE_BOUND, delays


async def test_expiry_wakes_the_waiter_promptly(backend: lockd.Backend) -> None:
    ttl = 0.15
    delays: list[float] = []
    for i in range(ROUNDS):
        sent = time.monotonic()
        await backend.acquire(NS, f"wake-{i}", "gone", ttl=ttl, wait=0)
        granted = time.monotonic()
        grant = await backend.acquire(NS, f"wake-{i}", "next", ttl=5, wait=3)
        woke = time.monotonic()
        assert grant.owner == "next"
        # Never before the ttl: the store granted "gone" after `sent` (its reply can
        # arrive late on a loaded machine, so `granted` is no lower bound).
        assert woke - sent >= ttl - 0.005
        delays.append(woke - granted - ttl)
    assert statistics.median(delays) < WAKE_BOUND, delays


def test_force_release_wakes_the_waiter(client: lockd.Client, other_client: lockd.Client) -> None:
    waiter = other_client.lock("wake", ttl=5)

    def wait_for_it() -> float:
        waiter.acquire(wait=5)
        woke = time.monotonic()
        waiter.release()
        return woke

    delays: list[float] = []
    for _ in range(ROUNDS):
        client.lock("wake", ttl=5, renew=False).acquire()
        worker = start(wait_for_it)
        queued(client, "wake", 1)
        forced = time.monotonic()
        assert len(client.force_release("wake")) == 1
        woke = worker.outcome()
        assert woke is not None
        delays.append(woke - forced)
    assert statistics.median(delays) < WAKE_BOUND, delays


def test_timed_out_waiter_leaves_the_queue(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    holder = client.lock("giveup", ttl=5)
    holder.acquire()
    before = snapshot(client.inspect("giveup"))
    waiter = other_client.lock("giveup", ttl=5)
    started = time.monotonic()
    with pytest.raises(AcquireTimeout):
        waiter.acquire(wait=0.2)
    elapsed = time.monotonic() - started
    assert 0.2 - 0.01 <= elapsed < 0.2 + SLACK
    info = client.inspect("giveup")
    assert info.waiters == ()
    assert snapshot(info) == before
    holder.release()
    assert waiter.try_acquire()
    waiter.release()


def test_failed_try_acquire_leaves_nothing_behind(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    holder = client.lock("try", ttl=5)
    holder.acquire()
    before = snapshot(client.inspect("try"))
    other = other_client.lock("try", ttl=5)
    for _ in range(50):
        assert not other.try_acquire()
    assert snapshot(client.inspect("try")) == before
    holder.release()
    assert other.try_acquire()
    other.release()


def test_waiter_that_gives_up_does_not_hold_up_those_behind(
    client: lockd.Client, other_client: lockd.Client
) -> None:
    holder = client.lock("line", ttl=5)
    holder.acquire()
    quitter = start(lambda: other_client.lock("line", ttl=5).acquire(wait=0.3))
    queued(client, "line", 1)
    patient = other_client.lock("line", ttl=5)

    def wait_long() -> float:
        patient.acquire(wait=5)
        woke = time.monotonic()
        patient.release()
        return woke

    behind = start(wait_long)
    queued(client, "line", 2)
    with pytest.raises(AcquireTimeout):
        quitter.outcome()
    # The quitter's place is gone at once; the patient waiter is now first.
    assert len(client.inspect("line").waiters) == 1
    released = time.monotonic()
    holder.release()
    woke = behind.outcome()
    assert woke is not None
    assert woke - released < SLACK


async def test_cancelled_waiter_leaves_the_queue(aclient: lockd.AsyncClient) -> None:
    lock = aclient.lock("cancel", ttl=5)
    await lock.acquire()
    order: list[str] = []

    async def wait_turn(tag: str) -> None:
        await lock.acquire(wait=5)
        order.append(tag)
        await lock.release()

    doomed = asyncio.create_task(wait_turn("doomed"))
    await aqueued(aclient, "cancel", 1)
    patient = asyncio.create_task(wait_turn("patient"))
    await aqueued(aclient, "cancel", 2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    info = await aclient.inspect("cancel")
    assert len(info.waiters) == 1
    released = time.monotonic()
    await lock.release()
    await patient
    assert time.monotonic() - released < SLACK
    assert order == ["patient"]
    assert (await aclient.inspect("cancel")).holders == ()


async def test_backend_cancelled_waiter_leaves_the_queue(backend: lockd.Backend) -> None:
    held = await backend.acquire(NS, "cancel", "a", ttl=5, wait=0)
    doomed = asyncio.create_task(backend.acquire(NS, "cancel", "b", ttl=5, wait=5))
    await bqueued(backend, "cancel", 1)
    patient = asyncio.create_task(backend.acquire(NS, "cancel", "c", ttl=5, wait=5))
    await bqueued(backend, "cancel", 2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert [w.owner for w in (await backend.inspect(NS, "cancel")).waiters] == ["c"]
    await backend.release(NS, "cancel", "a", held.token)
    assert (await patient).owner == "c"


# When, relative to the release that grants it, a queued acquire is cancelled: before the
# release starts, at each of its first scheduling points, and a little later.
CANCEL_POINTS = [-1, 0, 1, 2, 3, 4, 0.001, 0.003]


@pytest.mark.parametrize("point", CANCEL_POINTS)
async def test_cancelled_acquire_granted_meanwhile_is_given_back(
    backend: lockd.Backend, point: float
) -> None:
    held = await backend.acquire(NS, "race", "a", ttl=5, wait=0)
    doomed = asyncio.create_task(backend.acquire(NS, "race", "b", ttl=5, wait=5))
    await bqueued(backend, "race", 1)
    behind = asyncio.create_task(backend.acquire(NS, "race", "c", ttl=5, wait=5))
    await bqueued(backend, "race", 2)
    if point == -1:
        doomed.cancel()
    releasing = asyncio.create_task(backend.release(NS, "race", "a", held.token))
    if isinstance(point, int):
        for _ in range(point):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(point)
    doomed.cancel()
    try:
        got = await doomed
    except asyncio.CancelledError:
        got = None
    await releasing
    if got is not None:
        # The grant reached its caller before the cancellation: it is the caller's.
        assert got.owner == "b"
        await backend.release(NS, "race", "b", got.token)
    # Either way nobody holds a grant it does not know of: "c" gets the lock promptly.
    grant = await asyncio.wait_for(behind, 1)
    assert grant.owner == "c"
    info = await backend.inspect(NS, "race")
    assert [h.owner for h in info.holders] == ["c"]
    assert info.waiters == ()


@pytest.mark.parametrize("yields", [0, 1, 2, 3, 4])
async def test_timed_out_acquire_granted_meanwhile_is_not_leaked(
    backend: lockd.Backend, yields: int
) -> None:
    held = await backend.acquire(NS, "late", "a", ttl=5, wait=0)
    # "b" must still be queued when both waiters are counted, on a loaded machine too.
    doomed_wait = 0.3
    started = time.monotonic()
    doomed = asyncio.create_task(backend.acquire(NS, "late", "b", ttl=5, wait=doomed_wait))
    await bqueued(backend, "late", 1)
    behind = asyncio.create_task(backend.acquire(NS, "late", "c", ttl=5, wait=5))
    await bqueued(backend, "late", 2)
    # "b"'s wait runs out while the loop is busy; the release then lands at one of the
    # next few scheduling points around the handling of that timeout.
    time.sleep(max(0.05, started + doomed_wait + 0.05 - time.monotonic()))  # noqa: ASYNC251
    for _ in range(yields):
        await asyncio.sleep(0)
    releasing = asyncio.create_task(backend.release(NS, "late", "a", held.token))
    try:
        got: lockd.Grant | None = await doomed
    except AcquireTimeout:
        got = None
    await releasing
    if got is not None:  # granted in time after all: the grant is the caller's
        await backend.release(NS, "late", "b", got.token)
    # A grant leaked to "b" would hold "c" off for its whole ttl (5 s).
    grant = await asyncio.wait_for(behind, 3)
    assert grant.owner == "c"
    assert [h.owner for h in (await backend.inspect(NS, "late")).holders] == ["c"]


async def test_cancelled_client_acquire_never_leaks_a_hold(aclient: lockd.AsyncClient) -> None:
    holder = aclient.lock("leak", ttl=5, owner="holder")
    delays = [0.0, 0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, None, None, None]
    for delay in delays:
        await holder.acquire()

        async def wait_for_it() -> bool:
            lock = aclient.lock("leak", ttl=5)
            await lock.acquire(wait=5)
            await lock.release()
            return True

        task = asyncio.create_task(wait_for_it())
        await aqueued(aclient, "leak", 1)
        await holder.release()
        if delay is None:
            await asyncio.sleep(0)
        elif delay:
            await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        async def free() -> bool:
            info = await aclient.inspect("leak")
            return info.holders == () and info.waiters == ()

        await await_until(free, within=1.0, what="the cancelled acquire gave its grant back")


async def test_release_finishes_even_when_its_caller_is_cancelled(
    aclient: lockd.AsyncClient,
) -> None:
    lock = aclient.lock("finish", ttl=5, owner="job")
    await lock.acquire()
    releasing = asyncio.create_task(lock.release())
    await asyncio.sleep(0)  # the release is on its way
    releasing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await releasing

    async def released() -> bool:
        info = await aclient.inspect("finish")
        return info.holders == () and lock.state is lockd.LockState.RELEASED

    await await_until(released, within=1.0, what="the release completed")


OBSERVERS = ["inspect", "list_locks", "acquire", "late release", "late extend", "stranger"]


@pytest.mark.parametrize("observer", OBSERVERS)
async def test_expiry_noticed_by_any_call_still_wakes_the_waiter(
    backend: lockd.Backend, observer: str
) -> None:
    held = await backend.acquire(NS, "gate", "a", ttl=0.2, wait=0)
    waiter = asyncio.create_task(backend.acquire(NS, "gate", "b", ttl=5, wait=2))
    await bqueued(backend, "gate", 1)
    # Keep the event loop busy past the expiry, so that the next call is served before
    # the store's expiry timer runs (as happens under load): whichever call notices the
    # expiry first, the waiter must be granted.
    time.sleep(0.3)  # noqa: ASYNC251
    noticed = time.monotonic()
    if observer == "inspect":
        await backend.inspect(NS, "gate")
    elif observer == "list_locks":
        await backend.list_locks(NS)
    elif observer == "acquire":
        with pytest.raises(AcquireTimeout):  # "b" is first in line, not "c"
            await backend.acquire(NS, "gate", "c", ttl=5, wait=0)
    elif observer == "late release":
        with pytest.raises(LockLost):
            await backend.release(NS, "gate", "a", held.token)
    elif observer == "late extend":
        with pytest.raises(LockLost):
            await backend.extend(NS, "gate", "a", held.token, 5)
    else:
        with pytest.raises(lockd.NotHeld):
            await backend.release(NS, "gate", "stranger", None)
    grant = await waiter
    assert grant.owner == "b"
    assert time.monotonic() - noticed < SLACK
    assert [h.owner for h in (await backend.inspect(NS, "gate")).holders] == ["b"]
