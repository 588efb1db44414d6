"""A lease as this client sees it: local deadline, renewal schedule and state, no I/O.

Theory of operation. A lease's *local deadline* is the latest moment, on this process's
monotonic clock, by which the store is sure to still count it: each answer is measured
from before the request that got it was sent (its *anchor*), less a drift margin, so the
client never believes in a lease the store has already dropped. No wall clock is used,
and no method reads a clock: every moment is passed in, so each transition is a pure
function of the state and its arguments (``tests/test_lease.py`` checks them one by one).

States: ``held -> at_risk`` (a renewal failed or is slow to answer) ``-> held`` (a
renewal answered) or ``-> lost`` (the deadline passed, or the store said it ended) or
``-> revoked`` (force-released); ``released`` by the holder. The first end wins.

The schedule: renew once ``RENEW_FRACTION`` of the ttl has passed; an attempt not
answered within ``ATTEMPT_FRACTION`` of the ttl is sent again; one not answered within
``min(ttl * SLOW_FRACTION, SLOW_MAX)`` makes the lease ``at_risk``; a failed attempt is
retried after a backoff doubling from ``RETRY_FIRST`` up to ``min(ttl / 6, RETRY_MAX)``;
nothing waits past the deadline. A lease that is not renewed is only checked at its
deadline.
"""

from __future__ import annotations

import math

from lockd.model import LockState

__all__ = [
    "ATTEMPT_FRACTION",
    "DRIFT",
    "RENEW_FRACTION",
    "RETRY_FIRST",
    "RETRY_MAX",
    "SLOW_FRACTION",
    "SLOW_MAX",
    "LeaseState",
]

RENEW_FRACTION = 1 / 3
"""Renew when this fraction of the ttl has passed."""
DRIFT = 0.01
"""Fraction of a duration by which the store's clock may run differently from ours."""
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
SLOW_FRACTION = 1 / 4
SLOW_MAX = 1.5
"""A renewal not answered within ``min(ttl * SLOW_FRACTION, SLOW_MAX)`` seconds turns the
lease ``at_risk``: above RedLock's per-node timeout (ttl/5, at most 1 s), which a healthy
quorum with one node down can take."""
ATTEMPT_FRACTION = 1 / 3
"""A renewal attempt not answered within this fraction of the ttl is sent again."""

ENDED = (LockState.LOST, LockState.REVOKED, LockState.RELEASED)
LOSSES = (LockState.LOST, LockState.REVOKED)


class LeaseState:
    """One lease's local deadline, renewal schedule and state (see the module doc)."""

    def __init__(self, ttl: float, anchor: float, ttl_left: float, renew: bool = True) -> None:
        self.ttl = ttl
        """The ttl each renewal asks for."""
        self.renew = renew
        self.state = LockState.HELD
        self.reason = ""
        """Why it ended, once it has."""
        self.deadline = 0.0
        self.renew_at = 0.0
        self.anchor = -math.inf
        """When the request whose answer set the lease was sent (at the earliest)."""
        self.lease(anchor, ttl_left)

    # --- answers ----------------------------------------------------------------------

    def lease(self, anchor: float, ttl_left: float) -> None:
        """Record that the store's lease runs ``ttl_left`` seconds from ``anchor`` (a moment
        before the request that got this answer was sent): the deadline follows the answer
        to the latest request sent, longer or shorter."""
        deadline = anchor + ttl_left * (1 - DRIFT)
        # A lease shorter than the ttl (a renewal sent before a longer re-entry, applied
        # after it) is renewed in time for its own end.
        renew_at = anchor + min(self.ttl, ttl_left) * RENEW_FRACTION
        if anchor < self.anchor:
            # The answer to a request sent before the one the lease came from: the store
            # may have applied that later request after this one (a renewal with a shorter
            # ttl after a re-entry), so this answer may only shorten the lease.
            self.deadline = min(self.deadline, deadline)
            self.renew_at = min(self.renew_at, renew_at)
            return
        self.anchor, self.deadline, self.renew_at = anchor, deadline, renew_at

    def unheard(self, sent: float, ttl: float) -> None:
        """An extend to ``ttl`` sent at ``sent`` went unanswered: the store may have
        applied it, so the deadline (and the next renewal) may only come sooner."""
        self.deadline = min(self.deadline, sent + ttl * (1 - DRIFT))
        self.renew_at = min(self.renew_at, sent + ttl * RENEW_FRACTION)

    def renewed(self, sent: float, ttl_left: float) -> bool:
        """A renewal sent at ``sent`` was answered ``ttl_left``: the lease goes on and is
        held again. True when that recovers it from ``at_risk``."""
        self.lease(sent, ttl_left)
        if self.state is LockState.AT_RISK:
            self.state = LockState.HELD
            return True
        return False

    def extended(self, sent: float, ttl: float, ttl_left: float) -> None:
        """An explicit extend to ``ttl`` sent at ``sent`` was answered: renewals ask for
        ``ttl`` from now on, and the lease is held (unless it ended meanwhile)."""
        if self.ended:
            return
        self.ttl = ttl
        self.lease(sent, ttl_left)
        self.state = LockState.HELD

    def reentered(self, ttl: float, anchor: float, ttl_left: float) -> None:
        """Acquired again with ``ttl``: renewals keep the longest of the nested ttls."""
        self.ttl = max(self.ttl, ttl)
        self.lease(anchor, ttl_left)

    # --- the schedule -----------------------------------------------------------------

    def next_due(self) -> float:
        """When the watchdog next acts: the next renewal, or (not renewed) the deadline."""
        return self.renew_at if self.renew else self.deadline

    def attempt_window(self, now: float) -> float:
        """Seconds an attempt sent at ``now`` is waited for before it is sent again."""
        return min(self.deadline - now, self.ttl * ATTEMPT_FRACTION)

    def slow_mark(self, now: float) -> float:
        """Seconds after ``now`` at which an unanswered attempt makes the lease at risk."""
        return min(self.deadline - now, self.ttl * SLOW_FRACTION, SLOW_MAX)

    def retry_pause(self, backoff: float, now: float) -> float:
        """Seconds to wait after a failed attempt at ``now`` (never past the deadline)."""
        return min(backoff, max(0.0, self.deadline - now))

    def next_backoff(self, backoff: float) -> float:
        """The backoff after ``backoff``: doubled, at most ``min(ttl / 6, RETRY_MAX)``."""
        return min(backoff * 2, max(RETRY_FIRST, self.ttl / 6), RETRY_MAX)

    # --- states -----------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once lost, revoked or released."""
        return self.state in ENDED

    def state_at(self, now: float) -> LockState:
        """The state as of ``now``: a live lease whose deadline has passed reads ``lost``
        even before the watchdog has noticed (after a pause of this process, say)."""
        state = self.state
        if state not in ENDED and now >= self.deadline:
            return LockState.LOST
        return state

    def at_risk(self) -> bool:
        """A renewal failed or is slow: ``held -> at_risk``. True when that changed it."""
        if self.state is LockState.HELD:
            self.state = LockState.AT_RISK
            return True
        return False

    def end(self, state: LockState, reason: str) -> bool:
        """End it as ``state`` (lost, revoked or released) for ``reason``, unless it has
        ended already. True when this call ended it."""
        if self.ended:
            return False
        self.reason = reason
        self.state = state
        return True
