"""Store outages under a client that holds: what the SDK promises when the store goes away.

Each test runs on every kind of store (``outage`` fixture): memory and file cut by a
switch, redis, RedLock's nodes and a ``lockd serve`` cut by TCP proxies. The SDK is used
through its public API; ``observer`` looks at the store itself, never cut.
"""

from __future__ import annotations

import time

import pytest

import lockd
from lockd import LockState
from tests.faults import (
    KINDS,
    SLACK,
    TTL,
    Outage,
    assert_live,
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


@pytest.mark.parametrize("outage", [k for k in KINDS if k != "http"], indirect=True)
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
