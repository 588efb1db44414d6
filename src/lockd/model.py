"""Types shared by the SDK, the backends and the server, and the one place input is validated.

Durations are seconds as ``float`` (a ``timedelta`` is accepted wherever a duration is).
``ttl`` is how long a hold lasts unrenewed; ``wait`` is how long an acquire may queue.
They are separate parameters and never stand in for each other.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import timedelta

from lockd.errors import InvalidRequest

__all__ = [
    "CONTROL_CHARACTERS",
    "DEFAULT_NAMESPACE",
    "MAX_KEEPALIVE",
    "MAX_LIMIT",
    "MAX_NAME_BYTES",
    "MAX_TTL",
    "MAX_WAIT",
    "MIN_TTL",
    "Capabilities",
    "Duration",
    "EndedHold",
    "Grant",
    "HolderInfo",
    "KeepaliveAnswer",
    "LockState",
    "ResourceInfo",
    "SafetyLevel",
    "WaiterInfo",
]

Duration = float | int | timedelta

MIN_TTL = 0.1
"""Shortest ttl accepted, in seconds. Shorter leases cannot be renewed reliably."""
MAX_TTL = 7 * 24 * 3600.0
"""Longest ttl accepted, in seconds (one week)."""
MAX_WAIT = 365 * 24 * 3600.0
"""Longest finite wait accepted, in seconds. ``wait=None`` waits without end."""
MAX_NAME_BYTES = 512
MAX_OWNER_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
MAX_LIMIT = 100_000
MAX_KEEPALIVE = 10_000
"""Most sessions one keepalive may renew."""
MAX_ENDED_REPORTS = 10_000
"""Most ended holds a session keeps to report (the newest); an older one is then found
ended by its holder's next release or extend instead."""
DEFAULT_NAMESPACE = "default"
_NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")
"""C0, DEL and C1: the characters no name, owner or request id may contain.

A fixed set, not the running Python's Unicode tables, so that a character assigned in a
newer Unicode version than the server knows is accepted like any other. Unassigned,
private-use, format and space characters are accepted; lone surrogates have no UTF-8
form and are refused as not unicode.
"""


class SafetyLevel(enum.IntEnum):
    """How strongly a store keeps mutual exclusion; callers can demand a minimum.

    ``TIMING_DEPENDENT`` (RedLock) is safe only while clocks and pauses stay within
    bounds; ``SINGLE_NODE`` is safe while its one node lives and keeps its data;
    ``LINEARIZABLE`` is safe through crashes of the kind the store says it survives.
    """

    TIMING_DEPENDENT = 1
    SINGLE_NODE = 2
    LINEARIZABLE = 3

    @classmethod
    def parse(cls, value: SafetyLevel | str) -> SafetyLevel:
        """Accept a level or its name (``"linearizable"``, ``"single-node"``, ...)."""
        if isinstance(value, SafetyLevel):
            return value
        key = str(value).strip().lower().replace("-", "_").upper()
        try:
            return cls[key]
        except KeyError:
            names = ", ".join(level.label for level in cls)
            raise InvalidRequest(f"unknown safety level {value!r}; use one of {names}") from None

    @property
    def label(self) -> str:
        """The level's name as written in docs and URLs, e.g. ``single-node``."""
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend promises (DESIGN contract item 13)."""

    safety: SafetyLevel
    fencing: bool
    """Tokens strictly increase per name across release, expiry and restart."""
    fair: bool
    """Blocked acquirers are granted in arrival order."""
    durable: bool
    """Holds and token counters survive a restart of the store."""
    shared_across_processes: bool
    """Clients in other processes or hosts can reach the same store directly."""
    sessions: bool = False
    """The store keeps sessions: leases that many holds share (``open_session``)."""


class LockState(enum.Enum):
    """Where a hold is in its life: ``held -> at_risk -> lost | revoked | released``.

    A lock that was never acquired reports ``released``.
    """

    HELD = "held"
    AT_RISK = "at_risk"
    LOST = "lost"
    REVOKED = "revoked"
    RELEASED = "released"


@dataclass(frozen=True, slots=True)
class Grant:
    """One successful acquisition, as the store answered it."""

    name: str
    owner: str
    token: int
    count: int
    """The owner's reentrant count after this acquisition (1 for a fresh grant)."""
    ttl: float
    """Seconds the hold lasts from the moment it was granted, unless extended."""
    waited: float = 0.0
    """Seconds the request waited in the store's queue before it was granted."""


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """One current holder of a resource."""

    owner: str
    token: int
    count: int
    ttl_left: float
    held_for: float
    acquired_at: float
    """Wall-clock time of the grant, for display only; leases never use it."""


@dataclass(frozen=True, slots=True)
class WaiterInfo:
    """One queued acquirer, in queue order."""

    owner: str
    waited: float


@dataclass(frozen=True, slots=True)
class EndedHold:
    """A hold a session kept that ended while the session lived (reported once, by the
    session's next keepalive): ``revoked`` (force-released) or ``released`` (by a
    release that did not name this session, such as another client's by the handle)."""

    namespace: str
    name: str
    owner: str
    token: int
    reason: str


@dataclass(frozen=True, slots=True)
class KeepaliveAnswer:
    """What a keepalive says of one live session: its ttl from now, and the holds it kept
    that ended since its last keepalive (at most MAX_ENDED_REPORTS, the newest)."""

    ttl: float
    ended: tuple[EndedHold, ...] = ()


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """A resource's holders, waiters and last issued token."""

    name: str
    limit: int
    holders: tuple[HolderInfo, ...] = ()
    waiters: tuple[WaiterInfo, ...] = ()
    last_token: int = 0
    namespace: str = DEFAULT_NAMESPACE

    @property
    def locked(self) -> bool:
        """True when anyone holds the resource."""
        return bool(self.holders)


# --- validation: the only place input rules live -------------------------------------------


def seconds(value: Duration, what: str) -> float:
    """Convert a duration to float seconds, refusing non-numbers, NaN and infinities."""
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{what} must be a number of seconds or a timedelta, not {value!r}")
    else:
        result = float(value)
    if not math.isfinite(result):
        raise InvalidRequest(f"{what} must be finite, not {result!r}")
    return result


def check_ttl(value: Duration) -> float:
    """Validate a ttl: ``MIN_TTL <= ttl <= MAX_TTL`` seconds; never reinterpreted."""
    ttl = seconds(value, "ttl")
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidRequest(f"ttl must be between {MIN_TTL} and {MAX_TTL:.0f} seconds, not {ttl}")
    return ttl


def check_wait(value: Duration | None) -> float | None:
    """Validate a wait: ``None`` waits without end, ``0`` tries once, else 0..MAX_WAIT."""
    if value is None:
        return None
    wait = seconds(value, "wait")
    if not 0 <= wait <= MAX_WAIT:
        raise InvalidRequest(
            f"wait must be between 0 and {MAX_WAIT:.0f} seconds or None, not {wait}"
        )
    return wait


def _check_text(value: object, what: str, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidRequest(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid unicode: {value!r}") from None
    if size > max_bytes:
        raise InvalidRequest(f"{what} is longer than {max_bytes} bytes")
    if CONTROL_CHARACTERS.search(value):
        raise InvalidRequest(f"{what} must not contain control characters: {value!r}")
    return value


def check_name(value: object) -> str:
    """Validate a lock name: 1 to MAX_NAME_BYTES bytes of UTF-8 without control characters."""
    return _check_text(value, "name", MAX_NAME_BYTES)


def check_owner(value: object) -> str:
    """Validate an owner id: 1 to 256 bytes of UTF-8 without control characters."""
    return _check_text(value, "owner", MAX_OWNER_BYTES)


def check_request_id(value: object) -> str | None:
    """Validate an optional request id: up to 128 bytes of UTF-8 without control characters."""
    if value is None:
        return None
    return _check_text(value, "request_id", MAX_REQUEST_ID_BYTES)


def check_session_id(value: object) -> str | None:
    """Validate an optional session id: the same rule as a request id."""
    if value is None:
        return None
    return _check_text(value, "session", MAX_REQUEST_ID_BYTES)


def check_session_ids(value: object) -> list[str]:
    """Validate the session ids of one keepalive: a list of 1 to MAX_KEEPALIVE ids."""
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidRequest(f"sessions must be a non-empty list of session ids, not {value!r}")
    if len(value) > MAX_KEEPALIVE:
        raise InvalidRequest(
            f"one keepalive takes at most {MAX_KEEPALIVE} sessions, not {len(value)}"
        )
    return [_check_text(item, "session", MAX_REQUEST_ID_BYTES) for item in value]


def check_prefix(value: object) -> str:
    """Validate a listing prefix: empty (everything) or a valid name prefix."""
    if value == "":
        return ""
    return _check_text(value, "prefix", MAX_NAME_BYTES)


def check_limit(value: object) -> int:
    """Validate a holder limit: an int from 1 (a lock) to MAX_LIMIT (a semaphore)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"limit must be an integer, not {value!r}")
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}, not {value}")
    return value


def check_namespace(value: object) -> str:
    """Validate a namespace: lower-case letters, digits, ``_.-``; up to 64 characters."""
    if not isinstance(value, str) or not _NAMESPACE_RE.fullmatch(value):
        raise InvalidRequest(
            "namespace must be 1-64 of a-z 0-9 _ . - starting with a letter or digit, "
            f"not {value!r}"
        )
    return value
