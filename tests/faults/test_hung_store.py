"""A store that stops answering: renewals hang instead of failing.

The stores behind TCP proxies (redis, RedLock's nodes, a ``lockd serve``) are blackholed:
requests are taken but never answered. The SDK must not wait for an error to turn the
hold ``at_risk``: a renewal unanswered for ``min(ttl * SLOW_FRACTION, SLOW_MAX)`` does.
(RedLock's per-node timeout, ttl/5 up to 1 s, fails the renewal sooner still.) The
memory and file stores are cut by a switch in this process, not a network, so they are
not among these kinds (``test_outages`` cuts them).
"""

from __future__ import annotations

import time

import pytest

import lockd
from lockd import LockState
from lockd._lease import RENEW_FRACTION, SLOW_FRACTION
from tests.faults import SLACK, Outage, at_risk_bound, holder_of, wait_until

pytestmark = pytest.mark.parametrize("outage", ["redis", "http", "redlock3"], indirect=True)

AT_RISK_SLACK = 0.1
"""What timer and polling latency may add to the moment a hold turns ``at_risk`` at
ttl=2: less than the ttl/12 by which a renewal attempt's own timeout (ATTEMPT_FRACTION)
comes later, so at_risk on that failure alone does not pass."""


def blackhole_until_at_risk(outage: Outage, lock: lockd.Lock) -> float:
    """Acquire ``lock`` and blackhole its store; the seconds from the grant until the
    hold reads ``at_risk``."""
    lock.acquire()
    granted = time.monotonic()
    outage.cut("blackhole")
    wait_until(lambda: lock.state is not LockState.HELD, lock.ttl, step=0.005)
    assert lock.state is LockState.AT_RISK, lock.state
    return time.monotonic() - granted


def test_an_unanswered_renewal_turns_at_risk_then_lost_in_time(
    outage: Outage, client: lockd.Client, observer: lockd.Client, name: str
) -> None:
    """at_risk after one renewal interval and min(ttl/4, 1.5 s); lost by the deadline."""
    ttl = 2.0
    lock = client.lock(name, ttl=ttl)
    start = time.monotonic()  # the store counts the lease from later than this
    at_risk = blackhole_until_at_risk(outage, lock)
    assert at_risk <= at_risk_bound(ttl, AT_RISK_SLACK), at_risk
    old = lock.token
    wait_until(lambda: lock.state is LockState.LOST, ttl, step=0.005)
    assert time.monotonic() - start < ttl  # before the store could let a rival in
    assert lock.lost.wait(SLACK)  # the watchdog ended it, not only the clock
    outage.restore()
    rival = client.lock(name, ttl=ttl, owner="rival")
    rival.acquire(wait=ttl + SLACK)
    assert rival.token is not None and old is not None and rival.token > old
    assert holder_of(observer, name) == ("rival", rival.token, 1)
    rival.release()


def test_a_long_ttl_turns_at_risk_within_the_cap(
    outage: Outage, client: lockd.Client, name: str
) -> None:
    """At ttl=10, at_risk comes SLOW_MAX after the renewal, not ttl/4 after it."""
    ttl = 10.0
    assert at_risk_bound(ttl, SLACK) < ttl * (RENEW_FRACTION + SLOW_FRACTION)
    lock = client.lock(name, ttl=ttl)
    at_risk = blackhole_until_at_risk(outage, lock)
    assert at_risk <= at_risk_bound(ttl, SLACK), at_risk
    outage.restore()
    wait_until(lambda: lock.state is LockState.HELD, ttl / 3)  # renewal recovers
    lock.release()
