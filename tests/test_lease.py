"""The client's lease state machine (``lockd._lease.LeaseState``), transition by transition.

Every moment is passed in by hand, so each expectation is exact: no clock is read.
"""

from __future__ import annotations

import pytest

from lockd._lease import (
    ATTEMPT_FRACTION,
    DRIFT,
    RENEW_FRACTION,
    RETRY_FIRST,
    RETRY_MAX,
    SLOW_MAX,
    LeaseState,
)
from lockd.model import LockState

HELD, AT_RISK, LOST = LockState.HELD, LockState.AT_RISK, LockState.LOST
REVOKED, RELEASED = LockState.REVOKED, LockState.RELEASED


def lease(ttl: float = 9.0, anchor: float = 100.0, left: float | None = None) -> LeaseState:
    return LeaseState(ttl, anchor, ttl if left is None else left)


# --- the deadline -----------------------------------------------------------------------------


def test_a_grant_sets_the_deadline_from_its_anchor_less_the_drift() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    assert state.deadline == pytest.approx(100.0 + 9.0 * (1 - DRIFT))
    assert state.renew_at == pytest.approx(100.0 + 9.0 * RENEW_FRACTION)
    assert (state.state, state.anchor) == (HELD, 100.0)


def test_a_grant_with_less_left_than_the_ttl_is_renewed_in_time_for_its_own_end() -> None:
    state = lease(ttl=9.0, anchor=100.0, left=3.0)
    assert state.deadline == pytest.approx(100.0 + 3.0 * (1 - DRIFT))
    assert state.renew_at == pytest.approx(100.0 + 3.0 * RENEW_FRACTION)


def test_the_answer_to_the_latest_request_sets_the_deadline_longer_or_shorter() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    state.lease(103.0, 2.0)
    assert state.deadline == pytest.approx(103.0 + 2.0 * (1 - DRIFT))
    state.lease(104.0, 9.0)
    assert state.deadline == pytest.approx(104.0 + 9.0 * (1 - DRIFT))
    assert state.anchor == 104.0


def test_an_answer_to_an_older_request_may_only_shorten_the_lease() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    state.lease(104.0, 9.0)
    longer, shorter = 104.0 + 9.0 * (1 - DRIFT), 101.0 + 1.0 * (1 - DRIFT)
    state.lease(102.0, 20.0)  # older and longer: ignored
    assert state.deadline == pytest.approx(longer)
    state.lease(101.0, 1.0)  # older and shorter: the store may have applied it last
    assert state.deadline == pytest.approx(shorter)
    assert state.anchor == 104.0


def test_an_unheard_extend_may_only_bring_the_deadline_and_the_renewal_sooner() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    state.unheard(101.0, 30.0)  # longer: changes nothing
    assert state.deadline == pytest.approx(100.0 + 9.0 * (1 - DRIFT))
    state.unheard(101.0, 1.0)
    assert state.deadline == pytest.approx(101.0 + 1.0 * (1 - DRIFT))
    assert state.renew_at == pytest.approx(101.0 + 1.0 * RENEW_FRACTION)


# --- states -----------------------------------------------------------------------------------


def test_a_live_lease_reads_lost_from_its_deadline_before_anyone_notices() -> None:
    state = lease(ttl=1.0, anchor=0.0)
    assert state.state_at(0.98) is HELD
    assert state.state_at(0.99) is LOST
    assert state.state is HELD  # only read so: nothing changed


def test_held_turns_at_risk_once_and_a_renewal_brings_it_back() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    assert state.at_risk() is True
    assert state.at_risk() is False  # already
    assert state.state_at(101.0) is AT_RISK
    assert state.renewed(103.0, 9.0) is True  # recovered
    assert state.state is HELD
    assert state.deadline == pytest.approx(103.0 + 9.0 * (1 - DRIFT))
    assert state.renewed(106.0, 9.0) is False  # held all along


def test_the_first_end_wins() -> None:
    state = lease()
    assert state.end(REVOKED, "force-released") is True
    assert state.end(LOST, "later") is False
    assert state.end(RELEASED, "later") is False
    assert (state.state, state.reason) == (REVOKED, "force-released")
    assert state.ended
    assert state.at_risk() is False


@pytest.mark.parametrize("ended", [LOST, REVOKED, RELEASED])
def test_an_ended_lease_keeps_its_state_past_the_deadline(ended: LockState) -> None:
    state = lease(ttl=1.0, anchor=0.0)
    state.end(ended, "why")
    assert state.state_at(50.0) is ended


def test_an_explicit_extend_sets_the_ttl_renewals_ask_for_and_holds_again() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    state.at_risk()
    state.extended(101.0, 30.0, 30.0)
    assert (state.ttl, state.state) == (30.0, HELD)
    assert state.renew_at == pytest.approx(101.0 + 30.0 * RENEW_FRACTION)


def test_an_extend_answered_after_the_end_leaves_it_ended() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    state.end(RELEASED, "released")
    state.extended(101.0, 30.0, 30.0)
    assert (state.ttl, state.state) == (9.0, RELEASED)


def test_a_reentry_keeps_the_longest_nested_ttl_for_renewal() -> None:
    state = lease(ttl=30.0, anchor=100.0)
    state.reentered(0.3, 101.0, 0.3)  # the store's lease is now 0.3 s ...
    assert state.ttl == 30.0  # ... but renewal asks for the outer 30 s
    assert state.deadline == pytest.approx(101.0 + 0.3 * (1 - DRIFT))
    assert state.renew_at == pytest.approx(101.0 + 0.3 * RENEW_FRACTION)  # in time for it
    state.reentered(60.0, 102.0, 60.0)
    assert state.ttl == 60.0


# --- the schedule -----------------------------------------------------------------------------


def test_the_next_action_is_the_renewal_or_without_renewal_the_deadline() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    assert state.next_due() == state.renew_at
    off = LeaseState(9.0, 100.0, 9.0, renew=False)
    assert off.next_due() == off.deadline


def test_an_attempt_is_waited_for_a_third_of_the_ttl_never_past_the_deadline() -> None:
    state = lease(ttl=9.0, anchor=100.0)
    assert state.attempt_window(103.0) == pytest.approx(9.0 * ATTEMPT_FRACTION)
    assert state.attempt_window(108.0) == pytest.approx(state.deadline - 108.0)


def test_a_slow_answer_makes_it_at_risk_after_a_quarter_ttl_at_most_slow_max() -> None:
    assert lease(ttl=2.0, anchor=0.0).slow_mark(0.5) == pytest.approx(0.5)
    assert lease(ttl=60.0, anchor=0.0).slow_mark(20.0) == SLOW_MAX
    near = lease(ttl=2.0, anchor=0.0)
    assert near.slow_mark(1.9) == pytest.approx(near.deadline - 1.9)


def test_backoff_doubles_up_to_a_sixth_of_the_ttl_and_never_waits_past_the_deadline() -> None:
    short, long = lease(ttl=0.6, anchor=0.0), lease(ttl=60.0, anchor=0.0)
    steps, backoff = [], RETRY_FIRST
    for _ in range(6):
        steps.append(backoff)
        backoff = long.next_backoff(backoff)
    assert steps == [RETRY_FIRST * 2**i for i in range(5)] + [RETRY_MAX]
    assert short.next_backoff(0.08) == pytest.approx(0.1)  # ttl / 6
    assert short.retry_pause(0.5, 0.5) == pytest.approx(short.deadline - 0.5)
    assert short.retry_pause(0.5, 5.0) == 0.0
