"""Store outages under a client that holds: what the SDK promises when the store goes away.

Each test runs on every kind of store (``outage`` fixture): memory and file cut by a
switch, redis, RedLock's nodes and a ``lockd serve`` cut by TCP proxies. The SDK is used
through its public API; ``observer`` looks at the store itself, never cut.
"""

from __future__ import annotations

import contextlib
import logging
import time

import pytest

import lockd
from lockd import LockState
from tests.faults import (
    OUTAGE,
    SLACK,
    TTL,
    Outage,
    assert_live,
    background,
    holder_of,
    lose_in_outage,
    wait_until,
)


def test_a_new_lock_of_the_same_owner_is_live_after_an_outage(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    first = client.lock(name, ttl=TTL, owner="me")
    first.acquire()
    old = first.token
    lose_in_outage(outage, first)
    with pytest.raises(lockd.LockLost):
        first.release()  # the holder's code hears of the loss, and is done with it
    again = client.lock(name, ttl=TTL, owner="me")
    again.acquire(wait=5)
    assert again.token is not None and old is not None and again.token > old
    assert_live(again, observer)
    again.release()
    assert holder_of(observer, name) is None


def test_another_owner_is_live_after_an_outage(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    first = client.lock(name, ttl=TTL)
    first.acquire()
    lose_in_outage(outage, first)
    other = client.lock(name, ttl=TTL, owner="other")
    other.acquire(wait=5)
    assert_live(other, observer)
    other.release()


def check_at_risk_at_the_first_failed_renewal(
    outage: Outage, client: lockd.Client, name: str
) -> None:
    """A hold turns ``at_risk`` within one renewal interval of its store being cut."""
    ttl = 1.5
    lock = client.lock(name, ttl=ttl)
    lock.acquire()
    granted = time.monotonic()
    outage.cut()
    wait_until(lambda: lock.state is not LockState.HELD, ttl)
    at_risk = time.monotonic() - granted
    assert lock.state is LockState.AT_RISK, lock.state
    assert at_risk <= ttl / 3 + 0.35, at_risk  # one renewal interval and a little
    outage.restore()
    wait_until(lambda: lock.state is LockState.HELD, ttl)  # renewal recovers in time
    lock.release()


def test_at_risk_comes_at_the_first_failed_renewal(
    outage: Outage, client: lockd.Client, name: str
) -> None:
    check_at_risk_at_the_first_failed_renewal(outage, client, name)


def test_lost_comes_before_the_store_lets_anyone_else_in(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    lock = client.lock(name, ttl=TTL)
    lock.acquire()
    outage.cut()
    rival = observer.lock(name, ttl=TTL)
    deadline = time.monotonic() + TTL + 2 * SLACK
    while not rival.try_acquire():
        # While the store still has our hold, the SDK may read held or at_risk.
        assert time.monotonic() < deadline, "the store never let the rival in"
        time.sleep(0.01)
    assert lock.state is LockState.LOST, lock.state  # at once, not after the watchdog's turn
    assert lock.lost.is_set()
    outage.restore()
    rival.release()


def test_an_acquire_that_waits_out_an_outage_is_live(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    lock = client.lock(name, ttl=TTL, wait=10, owner="me")
    outage.cut()
    with background(lock.acquire) as acquired:
        time.sleep(OUTAGE)  # the acquire keeps trying for longer than the ttl
        outage.restore()
        acquired.result(10)
    assert_live(lock, observer)
    lock.release()
    assert holder_of(observer, name) is None


def test_no_orphan_hold_or_stale_reentry_after_an_outage(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    lock = client.lock(name, ttl=TTL, wait=10, owner="me")
    outage.cut()
    with background(lock.acquire) as acquired:
        time.sleep(OUTAGE)
        outage.restore()
        acquired.result(10)
    token = lock.token
    with contextlib.suppress(lockd.LockLost):
        lock.release()
    again = client.lock(name, ttl=TTL, owner="me")
    again.acquire(wait=5)
    seen = holder_of(observer, name)
    assert seen is not None and seen[2] == 1, seen  # never count 2 on a hold given up on
    assert again.count == 1
    if again.token == token:
        assert lock.state is LockState.RELEASED  # the same hold, released properly before
    again.release()
    assert holder_of(observer, name) is None
    assert observer.lock(name, ttl=TTL).try_acquire()  # another client gets it at once


def test_a_release_cut_off_does_not_stay_held(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    lock = client.lock(name, ttl=TTL)
    lock.acquire()
    outage.cut()
    with pytest.raises(lockd.BackendUnavailable):
        lock.release()
    assert lock.state in (LockState.LOST, LockState.RELEASED), lock.state
    outage.restore()
    waited = wait_until(lambda: holder_of(observer, name) is None, TTL + SLACK)
    assert waited <= TTL + SLACK  # nothing renews it
    assert lock.state in (LockState.LOST, LockState.RELEASED), lock.state
    assert observer.lock(name, ttl=TTL).try_acquire()


def test_a_loss_raises_once_then_acquire_gets_a_new_hold(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    lock = client.lock(name, ttl=TTL, wait=5)
    lock.acquire()
    old = lock.token
    lose_in_outage(outage, lock)
    with pytest.raises(lockd.LockLost):
        lock.acquire()
    lock.acquire()  # queues for a new hold
    assert lock.token is not None and old is not None and lock.token > old
    assert_live(lock, observer)
    lock.release()


def test_a_with_block_after_a_loss_in_a_nested_hold_raises_once(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    lock = client.lock(name, ttl=TTL, wait=5)
    lock.acquire()
    lock.acquire()  # nested: count 2
    lose_in_outage(outage, lock)
    raised = 0
    for _ in range(5):
        try:
            with lock:
                pass
        except lockd.LockLost:
            raised += 1
    assert raised == 1
    assert holder_of(observer, name) is None


def test_a_hold_given_up_during_an_outage_does_not_raise_on_every_later_block(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    """The run that saw 362 LockLost raises, step by step: a grant that reads lost when
    it arrives leaves an orphan the next acquire re-enters (the SDK then counts 2 where
    the caller nested once), and a later loss leaves a count no ``with`` block unwinds."""
    lock = client.lock(name, ttl=TTL, wait=5, owner="me")
    outage.cut()
    with background(lock.acquire) as acquired:
        time.sleep(OUTAGE)
        outage.restore()
        acquired.result(10)
    with contextlib.suppress(lockd.LockLost), lock:
        pass
    with contextlib.suppress(lockd.LockLost), lock:
        pass
    outage.cut()
    time.sleep(OUTAGE)
    outage.restore()
    raised = 0
    for _ in range(5):
        try:
            with lock:
                pass
        except lockd.LockLost:
            raised += 1
    assert raised <= 1
    assert holder_of(observer, name) is None


# Only redis keeps a waiter whose client is gone: a cut switch cancels the call in the
# store, and a server ends a wait of one poll when its connection drops.
@pytest.mark.parametrize("outage", ["redis", "redlock3"], indirect=True)
def test_an_acquire_given_up_in_an_outage_leaves_the_queue(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    """Its retries end in BackendUnavailable: the SDK abandons it at the store, which would
    otherwise keep it queued for its waiter lease (3 s), next in line for the name."""
    # A RedLock waiter checks in at the holder's expiry: so it sees the cut within its
    # wait, and ends in BackendUnavailable (not AcquireTimeout).
    holder = observer.lock(name, ttl=0.5)
    holder.acquire()
    waiter = client.lock(name, ttl=TTL, owner="given-up", wait=1)
    with background(waiter.acquire) as acquiring:
        wait_until(lambda: [w.owner for w in observer.inspect(name).waiters] == ["given-up"], 5)
        outage.cut()
        with pytest.raises(lockd.BackendUnavailable):
            acquiring.result(5)
    outage.restore()
    wait_until(lambda: not observer.inspect(name).waiters, 1.0)  # the abandon's retry lands
    holder.release()
    assert holder_of(observer, name) is None  # nothing granted to the given-up request
    assert observer.lock(name, ttl=TTL).try_acquire()


def test_log_lines_name_the_lock_and_the_store(
    outage: Outage, client: lockd.Client, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry, at-risk and loss lines of an outage each name the lock and the store."""
    caplog.set_level(logging.WARNING, logger="lockd")

    def lines(marker: str) -> list[str]:
        said = [record.getMessage() for record in caplog.records if record.name == "lockd"]
        return [line for line in said if marker in line]

    lock = client.lock(name, ttl=TTL)
    lock.acquire()
    outage.cut()
    with pytest.raises(lockd.BackendUnavailable):  # retried for a second (a shorter wait)
        client.lock(name, ttl=TTL, owner="late").acquire(wait=0.5)
    wait_until(lambda: bool(lines(") lost: ")), TTL + SLACK)
    outage.restore()
    for marker in ("acquiring ", " is at risk", ") lost: "):  # retry, at risk, loss
        assert lines(marker), marker
        for line in lines(marker):  # the store also shows in the error text: look before it
            assert f"{name!r} on {outage.url}" in line, line
