"""How a queued acquire waits, on the I/O loop or in a caller's thread: when it checks
in, what it does after each pause, and the grant a wake-up brings."""

from __future__ import annotations

import time
from typing import Any

CHECK_IN = 1.0
"""Seconds between a queued waiter's check-ins (the bounded re-check)."""
WAITER_LEASE = 3.0
"""Seconds a queued waiter keeps its place without checking in."""


def check_in_pause(reply: list[Any], end: float | None) -> float:
    """Seconds a queued waiter waits for its wake-up before checking in: at most
    CHECK_IN, until the earliest holder expiry, and not past its own ``end``."""
    pause = CHECK_IN
    if int(reply[1]) >= 0:  # wake at the earliest holder expiry, too
        pause = min(pause, int(reply[1]) / 1000 + 0.002)
    if end is not None:
        pause = min(pause, end - time.monotonic())
    return pause


def after_pause(delivered: list[Any] | None, end: float | None) -> list[Any] | str:
    """What a queued waiter does after a pause: take the grant delivered meanwhile (its
    reply), else its next step's mode: ``leave`` once its wait has ended (a grant made
    meanwhile is still its own), or ``wait`` (check in)."""
    if delivered is not None:
        return delivered
    return "leave" if end is not None and time.monotonic() >= end else "wait"


def delivered_grant(item: str) -> list[Any] | None:
    """The acquire reply carried by a wake-up ``ATTEMPT=token,count,ttl_ms,waited_us``
    (None for a bare ``ATTEMPT``: removed or replaced, to be asked about)."""
    grant = item.partition("=")[2]
    if not grant:
        return None
    token, count, ttl_left, waited = grant.split(",")
    return ["granted", token, count, ttl_left, waited]
