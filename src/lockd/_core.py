"""The lock table: every grant, queue and deny decision, with no I/O and no clock of its own.

Theory of operation. A *resource* is a (namespace, name) pair with up to ``limit``
holders and a FIFO queue of waiters. Every method takes ``now``, a reading of the
store's monotonic clock, so the table is a pure function of its state, the event and
that reading; the memory and file backends wrap it with futures and persistence.

Rules (each one is a contract item of docs/architecture.md):

* Every hold lives by its *leases*: at most one of its own (``ttl``, ``expires``), set by
  the calls that name no session, and the *sessions* its acquirers named: leases with an
  id that many holds and waiters share, made by ``open_session`` and renewed for all of
  them at once by ``keepalive``. A hold lasts until the last of its leases ends, so
  whoever holds it (an owner may be shared by several clients, each with its session)
  can count on the lease it keeps. A hold whose leases have all ended is gone; every
  method first drops such holds of the resource it touches (``_expire``), so expiry is
  decided by the store's clock only, and grants the freed slots to the queue at once.
* A session that expires or is revoked ends in one step: its waiters leave their
  queues (their wakes get ``SessionLost``), its holds lose it as a lease (those with no
  other live lease end), and freed slots go to the next waiters. A call naming a session
  that has ended gets ``SessionLost`` and changes nothing; a session is never renewed
  past its end. A call naming a session gives the session's ttl as its own (a mismatch
  is refused).
* Reentrancy: an owner that already holds gets the same token and ``count + 1`` at once,
  even with waiters queued (queueing behind yourself would deadlock). The re-entry's
  session joins the hold's leases; without one, its own lease moves to ``ttl`` from now
  if that is later, so its expiry never moves earlier, and neither does the ttl a
  restart would restore. ``extend`` adds the session it names, or sets its own lease to
  ``ttl`` from now. A release naming a session also takes that session off the hold (the
  releasing client has no count left in it).
* A new owner is granted only when a slot is free *and* nobody is queued: arrivals never
  barge past waiters (FIFO). Otherwise it is denied, and the caller may ``enqueue``.
* Whenever a slot frees (release, expiry, force-release, a waiter leaving), queued
  waiters are granted in order, inside the same step (``_settle``). The grants are
  *handoffs* for the caller to deliver: the methods that free slots return them, and
  ``take_handoffs`` returns any made along the way by other methods (an expiry noticed
  by an acquire or inspect).
* Tokens come from one counter for the whole table (``last_token``, kept apart from
  any name), so each new grant of a name gets a token strictly greater than every
  earlier grant of that name, even after the name's own records were pruned.
  Reentrant grants reuse the holder's token.
* Each name that issued a token has a record (``NameRecord``): its last token, the
  tokens an administrator revoked and the owners evicted (each bounded).
* Release and extend match on owner and, when given, token. When no hold matches, the
  error is judged for this name alone, first match wins, and nothing changes:
  a token of another owner's live hold is ``NotHeld``; a revoked token, or no token
  from an owner whose latest hold here was evicted, is ``Revoked``; a token this name
  issued (``0 < token <= last``) is ``LockLost``; anything else is ``NotHeld``.
* A request id makes a retried acquire or release apply once: the first outcome is
  remembered (bounded, and for ``retention`` seconds) and answered again. An acquire
  whose caller has gone can be *abandoned* by its request id at any stage: queued,
  granted, or not yet arrived.
* A resource with a holder or waiter keeps its ``limit``; asking with another limit is
  refused. A resource with neither is forgotten, and its name's record is pruned once
  the name has been idle for ``retention`` seconds (a late release or extend then gets
  ``NotHeld``).

Every change to holds, sessions, the counter, name records and remembered requests is
noted as dirty so the file backend can persist exactly that before it answers (a
keepalive changes nothing durable: a restart gives every lease its full ttl).
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from lockd.errors import (
    AcquireTimeout,
    InvalidRequest,
    LockError,
    LockLost,
    NotHeld,
    Revoked,
    SessionLost,
)
from lockd.model import (
    MAX_ENDED_REPORTS,
    EndedHold,
    Grant,
    HolderInfo,
    KeepaliveAnswer,
    ResourceInfo,
    WaiterInfo,
)

__all__ = [
    "RETENTION",
    "Changes",
    "Hold",
    "Lease",
    "LockTable",
    "NameRecord",
    "Session",
    "Waiter",
]

Key = tuple[str, str]
"""(namespace, name)"""
HoldKey = tuple[str, str, str]
"""(namespace, name, owner)"""
RequestKey = tuple[str, str, str, str, str]
"""(operation, namespace, name, owner, request id)"""

W = TypeVar("W")
T = TypeVar("T")
Outcome = Grant | LockError
"""What a waiter is handed: its grant, or why it left the queue (``SessionLost``)."""

MAX_REMEMBERED_REQUESTS = 100_000
MAX_NAME_RECORDS = 32
"""Revoked tokens, and evicted owners, kept per name (the newest)."""
RETENTION = 600.0
"""Seconds an idle name's record and a remembered request id are kept."""


@dataclass(slots=True, eq=False)
class Lease:
    """A hold's own lease: ``ttl`` seconds, ending at ``expires`` on the store's clock."""

    ttl: float
    expires: float


@dataclass(slots=True, eq=False)
class Session(Lease):
    """A lease with an id that many holds and waiters share, renewed by one keepalive."""

    id: str = ""
    holds: set[Hold] = field(default_factory=set)
    waiters: set[Waiter[Any]] = field(default_factory=set)
    ended: deque[EndedHold] = field(default_factory=lambda: deque(maxlen=MAX_ENDED_REPORTS))
    """Holds it kept that ended otherwise than with it, for its next keepalive to report."""


@dataclass(slots=True, eq=False)
class Hold:
    """One owner's hold on a resource."""

    key: Key
    owner: str
    token: int
    count: int
    own: Lease | None
    """Its own lease, set by the calls that named no session."""
    sessions: tuple[Session, ...]
    """The sessions its acquirers named."""
    limit: int
    granted: float
    """Store clock reading when the hold began (moved back by the time held on a restore)."""
    acquired_at: float
    """Wall-clock time of the grant, for display only."""

    @property
    def expires(self) -> float:
        """When the last of its leases ends, on the store's clock."""
        end = -math.inf if self.own is None else self.own.expires
        for session in self.sessions:
            end = max(end, session.expires)
        return end


@dataclass(slots=True, eq=False)
class Waiter(Generic[W]):
    """A queued acquirer. ``wake`` is the backend's own handle (a future)."""

    key: Key
    owner: str
    ttl: float
    enqueued: float
    wake: W
    request_id: str | None = None
    acquired_at: float = 0.0
    """Wall-clock time of the request, for display only."""
    grant: Grant | None = None
    """Set by the step that granted it (before the backend delivers the grant)."""
    session: Session | None = None
    """The session it waits in: the hold it gets lives by it, and it ends with it."""


class NameRecord:
    """What a name remembers for judging late calls: its last token, revocations, evictions.

    Most names are never force-released, so the two records are made on first use (a
    million held names would otherwise carry two million empty dicts).
    """

    __slots__ = ("_evicted", "_revoked", "last_token")

    def __init__(self, last_token: int = 0, revoked: Iterable[int] = (),
                 evicted: Iterable[str] = ()) -> None:  # fmt: skip
        self.last_token = last_token
        self._revoked: dict[int, None] | None = dict.fromkeys(revoked) or None
        self._evicted: dict[str, None] | None = dict.fromkeys(evicted) or None

    @property
    def revoked(self) -> Mapping[int, None]:
        """Force-released tokens, oldest first (bounded)."""
        return self._revoked or _NOTHING

    @property
    def evicted(self) -> Mapping[str, None]:
        """Owners whose latest hold on this name was force-released, oldest first (bounded)."""
        return self._evicted or _NOTHING

    def evict(self, token: int, owner: str) -> None:
        """Record a force-released hold: its token and its owner."""
        self._revoked = _add_bounded(self._revoked, token)
        self._evicted = _add_bounded(self._evicted, owner)

    def forgive(self, owner: str) -> None:
        """``owner`` was granted the name again: its eviction no longer speaks for it."""
        if self._evicted is not None:
            self._evicted.pop(owner, None)

    def merge(self, other: NameRecord) -> None:
        """Take in what ``other`` (read back from disk) remembers."""
        self.last_token = max(self.last_token, other.last_token)
        for token in other.revoked:
            self._revoked = _add_bounded(self._revoked, token)
        for owner in other.evicted:
            self._evicted = _add_bounded(self._evicted, owner)

    def copy(self) -> NameRecord:
        """An independent copy (for the writer)."""
        return NameRecord(self.last_token, self.revoked, self.evicted)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NameRecord):
            return NotImplemented
        return (self.last_token, list(self.revoked), list(self.evicted)) == (
            other.last_token, list(other.revoked), list(other.evicted)
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"NameRecord({self.last_token}, revoked={list(self.revoked)}, "
                f"evicted={list(self.evicted)})")  # fmt: skip


_NOTHING: Mapping[Any, None] = MappingProxyType({})


@dataclass(slots=True)
class _Resource(Generic[W]):
    limit: int
    holds: dict[str, Hold] = field(default_factory=dict)
    waiters: list[Waiter[W]] = field(default_factory=list)


@dataclass(slots=True)
class Changes:
    """What changed since the last ``take_changes``: the file backend persists it."""

    holds: dict[HoldKey, Hold | None]
    sessions: dict[str, float | None]
    """Each opened session's ttl; None: it ended."""
    last_token: int | None
    """The store-wide counter, when it moved."""
    requests: list[tuple[RequestKey, int]]
    names: dict[Key, NameRecord | None]
    """Each changed name's record; None: pruned."""

    def __bool__(self) -> bool:
        return bool(
            self.holds
            or self.sessions
            or self.last_token is not None
            or self.requests
            or self.names
        )


class LockTable(Generic[W]):
    """All resources of one store, and the rules above."""

    def __init__(self, retention: float = RETENTION) -> None:
        self.retention = retention
        self._resources: dict[Key, _Resource[W]] = {}
        self.last_token = 0
        self._requests: OrderedDict[RequestKey, tuple[int, float]] = OrderedDict()
        self._records: dict[Key, NameRecord] = {}
        self._idle: OrderedDict[Key, float] = OrderedDict()
        """Names with a record and no resource, by when they went idle (oldest first)."""
        self._sessions: dict[str, Session] = {}
        self._waiting: set[Key] = set()
        """Names with waiters (kept as queues change, so no sweep looks at every name)."""
        self._due: list[tuple[float, Key]] = []
        """(expiry, name) of every own lease set: a heap the sweep pops (entries of a lease
        since replaced are popped at their time and find nothing to do)."""
        self._dirty_holds: dict[HoldKey, Hold | None] = {}
        self._dirty_sessions: dict[str, float | None] = {}
        self._dirty_token = False
        self._new_requests: list[tuple[RequestKey, int]] = []
        self._dirty_names: dict[Key, NameRecord | None] = {}
        self._pending: list[tuple[Waiter[W], Outcome]] = []
        self._now = 0.0
        """The latest clock reading seen (request ids remembered without one use it)."""

    # --- sessions ---------------------------------------------------------------------

    def open_session(self, session_id: str, ttl: float, now: float) -> Session:
        """Start a session of ``ttl`` seconds (the caller picks an id no session has had)."""
        if session_id in self._sessions:
            raise InvalidRequest(f"session {session_id!r} exists already")
        session = self._sessions[session_id] = Session(ttl, now + ttl, session_id)
        self._dirty_sessions[session_id] = ttl
        return session

    def keepalive(self, session_ids: list[str], now: float) -> list[KeepaliveAnswer | None]:
        """Renew each session for its ttl from ``now``; answers its ttl and the holds it
        kept that ended since (reported once), or None when it has ended (an expired
        one ends now, with all it had)."""
        answers: list[KeepaliveAnswer | None] = []
        for session_id in session_ids:
            session = self._live_session(session_id, now)
            if session is None:
                answers.append(None)
                continue
            session.expires = now + session.ttl
            answers.append(KeepaliveAnswer(session.ttl, tuple(session.ended)))
            session.ended.clear()
        return answers

    def revoke_session(self, session_id: str, now: float) -> list[tuple[Waiter[W], Outcome]]:
        """End a session now with all it had (a client closing); returns the handoffs."""
        session = self._sessions.get(session_id)
        if session is not None:
            self._end_session(session, now, "revoked")
        return self.take_handoffs()

    def session(self, session_id: str, ttl: float, now: float) -> Session:
        """The live session ``session_id`` of ``ttl``, for a call that names it."""
        session = self._live_session(session_id, now)
        if session is None:
            raise SessionLost(f"session {session_id!r} has ended")
        if session.ttl != ttl:
            raise InvalidRequest(
                f"ttl {ttl} does not match the ttl {session.ttl} of session {session_id!r}"
            )
        return session

    # --- operations -------------------------------------------------------------------

    def acquire(
        self,
        key: Key,
        owner: str,
        ttl: float,
        limit: int,
        now: float,
        wall: float,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> Grant | None:
        """Grant at once if the rules allow, else return None (the caller may enqueue)."""
        self._now = now
        if self._remembered(("abandon", *key, owner, request_id or "")) is not None:
            raise AcquireTimeout("this request was abandoned by its caller", name=key[1],
                                 owner=owner)  # fmt: skip
        remembered = self._remembered(("acquire", *key, owner, request_id or ""))
        session = self._named(session_id, ttl, now)
        res = self._resources.get(key)
        if res is not None:
            self._expire(key, res, now)
        if remembered is not None:
            hold = res.holds.get(owner) if res is not None else None
            if hold is None or hold.token != remembered:
                raise LockLost(
                    "this request was granted before, and that hold has ended",
                    name=key[1], owner=owner, token=remembered,
                )  # fmt: skip
            return self._grant_of(key, hold, now, waited=0.0)
        if res is None or not (res.holds or res.waiters):
            res = self._resources[key] = _Resource(limit)
            self._idle.pop(key, None)
        elif res.limit != limit:
            raise InvalidRequest(
                f"{key[1]!r} is held with limit {res.limit}; this request asks for limit {limit}",
                name=key[1], owner=owner,
            )  # fmt: skip
        hold = res.holds.get(owner)
        if hold is not None:
            self._reenter(hold, ttl, now, session)
        elif len(res.holds) < res.limit and not res.waiters:
            hold = self._new_hold(key, res, owner, ttl, session, now, wall)
        else:
            return None
        self._remember(("acquire", *key, owner, request_id or ""), hold.token, request_id)
        return self._grant_of(key, hold, now, waited=0.0)

    def enqueue(self, waiter: Waiter[W]) -> Waiter[W] | None:
        """Queue a denied acquirer; returns a waiter it replaces (same owner and request id)."""
        key = waiter.key
        res = self._resources.get(key)
        if res is None:
            raise InvalidRequest("enqueue without a denied acquire", name=key[1])
        if waiter.session is not None:
            waiter.session.waiters.add(waiter)
        if waiter.request_id is not None:
            for i, queued in enumerate(res.waiters):
                if queued.owner == waiter.owner and queued.request_id == waiter.request_id:
                    res.waiters[i] = waiter  # a retry keeps the original's place
                    self._unlist(queued)
                    return queued
        res.waiters.append(waiter)
        self._waiting.add(key)
        return None

    def dequeue(self, waiter: Waiter[W], now: float) -> list[tuple[Waiter[W], Outcome]]:
        """Remove a waiter that gave up; returns handoffs its leaving made possible."""
        key = waiter.key
        res = self._resources.get(key)
        if res is None or waiter not in res.waiters:
            return []
        res.waiters.remove(waiter)
        self._unlist(waiter)
        self._pending += self._settle(key, res, now)
        return self.take_handoffs()

    def is_queued(self, waiter: Waiter[W]) -> bool:
        """Whether ``waiter`` is still in its queue (neither granted nor gone)."""
        res = self._resources.get(waiter.key)
        return res is not None and waiter in res.waiters

    def abandon(
        self, key: Key, owner: str, request_id: str, now: float
    ) -> tuple[Waiter[W] | None, list[tuple[Waiter[W], Outcome]]]:
        """The caller of acquire ``request_id`` has gone: undo it, whatever stage it reached.

        A queued waiter leaves (and is returned, for the caller to fail its wake); a
        grant is released once; a request not seen yet is refused when it arrives.
        Abandoning twice does nothing more. Returns (waiter removed, handoffs).
        """
        self._now = now
        abandon_key: RequestKey = ("abandon", *key, owner, request_id)
        if self._remembered(abandon_key) is not None:
            return None, []
        self._remember(abandon_key, 1, request_id)
        res = self._resources.get(key)
        if res is not None:
            for waiter in res.waiters:
                if waiter.owner == owner and waiter.request_id == request_id:
                    return waiter, self.dequeue(waiter, now)
        token = self._remembered(("acquire", *key, owner, request_id))
        if token is not None:
            with contextlib.suppress(NotHeld):  # it ended already: nothing to undo
                return None, self.release(key, owner, token, now)[1]
        return None, self.take_handoffs()

    def release(
        self,
        key: Key,
        owner: str,
        token: int | None,
        now: float,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> tuple[int, list[tuple[Waiter[W], Outcome]]]:
        """Drop one count of the owner's hold, and session ``session_id`` from its leases;
        returns (count left, handoffs)."""
        self._now = now
        remembered = self._remembered(("release", *key, owner, request_id or ""))
        if remembered is not None:
            return remembered, []
        res, hold = self._find(key, owner, token, now)
        hold.count -= 1
        for session in hold.sessions:
            if session.id == session_id:
                self._detach(hold, session)
        if hold.count == 0 or hold.expires <= now:  # none left, or nothing keeps the rest
            self._drop(res, hold, "released")
        else:
            self._dirty_holds[(*key, owner)] = hold
        self._remember(("release", *key, owner, request_id or ""), hold.count, request_id)
        self._pending += self._settle(key, res, now)
        return hold.count, self.take_handoffs()

    def extend(
        self,
        key: Key,
        owner: str,
        token: int | None,
        ttl: float,
        now: float,
        session_id: str | None = None,
    ) -> Grant:
        """Set the owner's own lease to ``ttl`` from now, or add session ``session_id`` to
        the hold's leases."""
        session = self._named(session_id, ttl, now)
        _, hold = self._find(key, owner, token, now)
        if session is not None:
            self._attach(hold, session)
        else:
            self._set_own(hold, Lease(ttl, now + ttl))
        self._dirty_holds[(*key, owner)] = hold
        return self._grant_of(key, hold, now, waited=0.0)

    def force_release(
        self, key: Key, owner: str | None, now: float
    ) -> tuple[list[Hold], list[tuple[Waiter[W], Outcome]]]:
        """Evict every holder (or one owner); their tokens and owners are recorded."""
        res = self._resources.get(key)
        if res is None:
            return [], self.take_handoffs()
        self._expire(key, res, now)
        evicted = [h for h in res.holds.values() if owner is None or h.owner == owner]
        record = self._records.setdefault(key, NameRecord()) if evicted else None
        for hold in evicted:
            self._drop(res, hold, "revoked")
            assert record is not None
            record.evict(hold.token, hold.owner)
        if record is not None:
            self._dirty_names[key] = record
        self._pending += self._settle(key, res, now)
        return evicted, self.take_handoffs()

    def expire(self, now: float, key: Key | None = None) -> list[tuple[Waiter[W], Outcome]]:
        """Drop holds past their ttl (of ``key``, or across the table, which also ends
        expired sessions and prunes idle names and old request ids); returns the handoffs."""
        if key is not None:
            self._drop_expired(now, key)
            return self.take_handoffs()
        for session in [s for s in self._sessions.values() if s.expires <= now]:
            self._end_session(session, now, "expired")
        # Only the names whose own leases came due: a sweep costs what expires, not a
        # look at every name (sessions' holds end with their sessions, above).
        due: set[Key] = set()
        while self._due and self._due[0][0] <= now:
            due.add(heapq.heappop(self._due)[1])
        for k in due:
            self._drop_expired(now, k)
        self._prune(now)
        return self.take_handoffs()

    def take_handoffs(self) -> list[tuple[Waiter[W], Outcome]]:
        """Return and clear grants made to waiters that the caller has not been given yet."""
        handoffs, self._pending = self._pending, []
        return handoffs

    # --- reading ----------------------------------------------------------------------

    def inspect(self, key: Key, now: float, wall: float) -> ResourceInfo:
        """Holders, waiters and the name's last token (0 once its record was pruned)."""
        del wall
        res = self._resources.get(key)
        if res is not None:
            self._expire(key, res, now)
        record = self._records.get(key)
        last = 0 if record is None else record.last_token
        if res is None:
            return ResourceInfo(name=key[1], namespace=key[0], limit=1, last_token=last)
        holders = tuple(
            HolderInfo(
                owner=h.owner,
                token=h.token,
                count=h.count,
                ttl_left=max(0.0, h.expires - now),
                held_for=max(0.0, now - h.granted),
                acquired_at=h.acquired_at,
            )
            for h in sorted(res.holds.values(), key=lambda h: h.token)
        )
        waiters = tuple(WaiterInfo(owner=w.owner, waited=now - w.enqueued) for w in res.waiters)
        return ResourceInfo(
            name=key[1],
            namespace=key[0],
            limit=res.limit,
            holders=holders,
            waiters=waiters,
            last_token=last,
        )

    def names(self, namespace: str, prefix: str, now: float) -> list[str]:
        """Names in a namespace with a holder or waiter, sorted."""
        self._drop_expired(now)  # its handoffs stay pending for take_handoffs
        return sorted(
            name
            for (ns, name), res in self._resources.items()
            if ns == namespace and name.startswith(prefix) and (res.holds or res.waiters)
        )

    def live_holders(self, key: Key, now: float) -> list[tuple[str, int]]:
        """(owner, token) of the holds of ``key`` live at ``now``, changing nothing."""
        res = self._resources.get(key)
        holds = () if res is None else res.holds.values()
        return sorted(((h.owner, h.token) for h in holds if h.expires > now), key=lambda x: x[1])

    def next_expiry(self, key: Key) -> float | None:
        """When the earliest hold of a resource with waiters expires (for a wake-up timer)."""
        res = self._resources.get(key)
        if res is None or not res.waiters or not res.holds:
            return None
        return min(h.expires for h in res.holds.values())

    def waiters_of(self, key: Key) -> list[Waiter[W]]:
        """The queue of ``key``, in order."""
        res = self._resources.get(key)
        return [] if res is None else list(res.waiters)

    def waiting_keys(self) -> list[Key]:
        """Resources that have waiters."""
        return list(self._waiting)

    def sizes(self) -> dict[str, int]:
        """How many resources, name records and request ids the table keeps (for tests)."""
        return {
            "resources": len(self._resources),
            "names": len(self._records),
            "requests": len(self._requests),
            "sessions": len(self._sessions),
        }

    # --- persistence ------------------------------------------------------------------

    def take_changes(self) -> Changes:
        """Return and clear what changed since the last call."""
        changes = Changes(
            # Copies: the writer may run after later steps changed the live state.
            holds={k: None if h is None else _copy(h) for k, h in self._dirty_holds.items()},
            sessions=self._dirty_sessions,
            last_token=self.last_token if self._dirty_token else None,
            requests=self._new_requests,
            names={k: None if r is None else r.copy() for k, r in self._dirty_names.items()},
        )
        self.drop_changes()
        return changes

    def drop_changes(self) -> None:
        """Forget what changed (a store that persists nothing)."""
        self._dirty_holds, self._dirty_sessions, self._dirty_token = {}, {}, False
        self._new_requests, self._dirty_names = [], {}

    def restore(
        self,
        holds: list[tuple[Key, Hold]],
        last_token: int,
        requests: list[tuple[RequestKey, int]],
        now: float,
        names: dict[Key, NameRecord] | None = None,
        wall: float | None = None,
        sessions: dict[str, float] | None = None,
    ) -> None:
        """Load persisted state after a restart. Every lease (a hold's own, or a session
        by its ttl in ``sessions``) gets its full ttl from ``now``: that never shortens a
        hold (safety) and still ends it within its ttl (liveness). Each hold carries its
        own lease's ttl and its sessions' ids; a session not in ``sessions`` has ended,
        and a hold left with no lease is not restored.
        With ``wall`` (the wall clock now), ``held_for`` goes on from each hold's
        ``acquired_at``. Remembered request ids and idle names count their retention
        from ``now``.
        """
        self._now = now
        for session_id, ttl in (sessions or {}).items():
            self._sessions[session_id] = Session(ttl, now + ttl, session_id)
        self.last_token = max(self.last_token, last_token)
        for key, record in (names or {}).items():
            mine = self._records.setdefault(key, NameRecord())
            mine.merge(record)
            self.last_token = max(self.last_token, mine.last_token)
        for key, hold in holds:
            held = 0.0 if wall is None else max(0.0, wall - hold.acquired_at)
            hold.granted = now - held
            hold.key = key
            if hold.own is not None:
                self._set_own(hold, Lease(hold.own.ttl, now + hold.own.ttl))
            hold.sessions = tuple(
                self._sessions[s.id] for s in hold.sessions if s.id in self._sessions
            )
            if hold.own is None and not hold.sessions:
                continue  # its sessions ended: so did it
            for session in hold.sessions:
                session.holds.add(hold)
            res = self._resources.setdefault(key, _Resource(hold.limit))
            res.holds[hold.owner] = hold
            self.last_token = max(self.last_token, hold.token)
            record = self._records.setdefault(key, NameRecord())
            record.last_token = max(record.last_token, hold.token)
        for key in self._records:
            if key not in self._resources:
                self._idle[key] = now
        for request_key, value in requests:
            self._requests.pop(request_key, None)
            self._requests[request_key] = (value, now)

    # --- internals --------------------------------------------------------------------

    def _find(
        self, key: Key, owner: str, token: int | None, now: float
    ) -> tuple[_Resource[W], Hold]:
        res = self._resources.get(key)
        live: set[int] = set()
        if res is not None:
            self._expire(key, res, now)
            hold = res.holds.get(owner)
            if hold is not None and (token is None or hold.token == token):
                return res, hold
            live = {h.token for h in res.holds.values() if h.owner != owner}
        raise self._judge(key, owner, token, live)

    def _judge(self, key: Key, owner: str, token: int | None, live: set[int]) -> NotHeld:
        """Why ``owner`` (with ``token``) holds nothing on ``key``: judged for this name alone."""
        record = self._records.get(key)
        name = key[1]
        if token is not None and token not in live and record is not None:
            if token in record.revoked:
                return Revoked("the hold was force-released", name=name, owner=owner, token=token)
            if 0 < token <= record.last_token:
                return LockLost("the hold has ended", name=name, owner=owner, token=token)
        if token is None and record is not None and owner in record.evicted:
            return Revoked("the hold was force-released", name=name, owner=owner)
        return NotHeld(f"{owner!r} does not hold {name!r}", name=name, owner=owner, token=token)

    def _new_hold(
        self,
        key: Key,
        res: _Resource[W],
        owner: str,
        ttl: float,
        session: Session | None,
        now: float,
        wall: float,
    ) -> Hold:
        self.last_token += 1
        self._dirty_token = True
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = NameRecord()
        record.last_token = self.last_token
        record.forgive(owner)
        self._dirty_names[key] = record
        hold = Hold(key, owner, self.last_token, 1, None, (), res.limit, now, wall)
        if session is not None:
            self._attach(hold, session)
        else:
            self._set_own(hold, Lease(ttl, now + ttl))
        res.holds[owner] = hold
        self._dirty_holds[(*key, owner)] = hold
        return hold

    def _expire(self, key: Key, res: _Resource[W], now: float) -> None:
        gone = [hold for hold in res.holds.values() if hold.expires <= now]
        for hold in gone:
            self._drop(res, hold)
        if gone:
            self._pending += self._settle(key, res, now)

    def _drop_expired(self, now: float, key: Key | None = None) -> None:
        for k in list(self._resources) if key is None else [key]:
            res = self._resources.get(k)
            if res is None:
                continue
            self._expire(k, res, now)
            if not (res.holds or res.waiters):
                self._forget(k, now)

    def _forget(self, key: Key, now: float) -> None:
        """Drop an idle resource; its name's record starts its retention."""
        self._resources.pop(key, None)
        self._waiting.discard(key)
        if key in self._records:
            self._idle.pop(key, None)
            self._idle[key] = now

    def _prune(self, now: float) -> None:
        """Forget names idle for ``retention`` and request ids older than that."""
        cutoff = now - self.retention
        while self._idle:
            key, since = next(iter(self._idle.items()))
            if since > cutoff:
                break
            del self._idle[key]
            if key not in self._resources:
                self._records.pop(key, None)
                self._dirty_names[key] = None
        while self._requests:
            _, (_, written) = next(iter(self._requests.items()))
            if written > cutoff:
                break
            self._requests.popitem(last=False)

    def _reenter(self, hold: Hold, ttl: float, now: float, session: Session | None) -> None:
        hold.count += 1
        if session is not None:
            self._attach(hold, session)
        elif hold.own is None or now + ttl >= hold.own.expires:  # never shorter, nor its ttl
            self._set_own(hold, Lease(ttl, now + ttl))
        self._dirty_holds[(*hold.key, hold.owner)] = hold

    def _set_own(self, hold: Hold, lease: Lease) -> None:
        """Give ``hold`` its own lease ``lease``; the sweep looks at its name when it ends."""
        hold.own = lease
        heapq.heappush(self._due, (lease.expires, hold.key))

    def _attach(self, hold: Hold, session: Session) -> None:
        if session not in hold.sessions:
            hold.sessions = (*hold.sessions, session)
            session.holds.add(hold)
            self._dirty_holds[(*hold.key, hold.owner)] = hold

    def _detach(self, hold: Hold, session: Session) -> None:
        hold.sessions = tuple(s for s in hold.sessions if s is not session)
        session.holds.discard(hold)
        self._dirty_holds[(*hold.key, hold.owner)] = hold

    def _drop(self, res: _Resource[W], hold: Hold, why: str | None = None) -> None:
        """Take ``hold`` out of its resource and its sessions; ``why`` it ended, when its
        sessions are to hear of it (not at its expiry, nor at a session's end)."""
        del res.holds[hold.owner]
        for session in hold.sessions:
            session.holds.discard(hold)
            if why is not None:
                session.ended.append(EndedHold(*hold.key, hold.owner, hold.token, why))
        self._dirty_holds[(*hold.key, hold.owner)] = None

    def _unlist(self, waiter: Waiter[W]) -> None:
        """Take a waiter that left its queue out of its session."""
        if waiter.session is not None:
            waiter.session.waiters.discard(waiter)

    def _named(self, session_id: str | None, ttl: float, now: float) -> Session | None:
        """The live session a call names (of the call's ttl), if it names one."""
        return None if session_id is None else self.session(session_id, ttl, now)

    def _live_session(self, session_id: str, now: float) -> Session | None:
        """The session, unless it has ended (one found expired ends now)."""
        session = self._sessions.get(session_id)
        if session is not None and session.expires <= now:
            self._end_session(session, now, "expired")
            return None
        return session

    def _end_session(self, session: Session, now: float, why: str) -> None:
        """End ``session`` with everything it had: its waiters leave their queues (told
        ``SessionLost``), its holds lose it (those with no other live lease end), and the
        freed slots are granted."""
        del self._sessions[session.id]
        self._dirty_sessions[session.id] = None
        touched: dict[Key, _Resource[W]] = {}
        for waiter in list(session.waiters):
            res = self._resources.get(waiter.key)
            if res is not None and waiter in res.waiters:
                res.waiters.remove(waiter)
                touched[waiter.key] = res
            lost = SessionLost(f"session {session.id!r} {why}", name=waiter.key[1],
                               owner=waiter.owner)  # fmt: skip
            self._pending.append((waiter, lost))
        for hold in list(session.holds):
            self._detach(hold, session)
            res = self._resources.get(hold.key)
            if res is not None and res.holds.get(hold.owner) is hold and hold.expires <= now:
                self._drop(res, hold)
                touched[hold.key] = res
        session.waiters.clear()
        session.holds.clear()
        for key, res in touched.items():
            self._pending += self._settle(key, res, now)

    def _settle(self, key: Key, res: _Resource[W], now: float) -> list[tuple[Waiter[W], Outcome]]:
        """Grant queued waiters in order while slots are free; forget an idle resource."""
        self._now = now
        handoffs: list[tuple[Waiter[W], Outcome]] = []
        while res.waiters:
            head = res.waiters[0]
            if head.session is not None and head.session.expires <= now:
                self._end_session(head.session, now, "expired")  # takes head out too
                continue
            hold = res.holds.get(head.owner)
            if hold is None and len(res.holds) >= res.limit:
                break
            res.waiters.pop(0)
            self._unlist(head)
            if hold is not None:
                self._reenter(hold, head.ttl, now, head.session)
            else:
                wall = head.acquired_at + (now - head.enqueued)  # display only
                hold = self._new_hold(key, res, head.owner, head.ttl, head.session, now, wall)
            self._remember(
                ("acquire", *key, head.owner, head.request_id or ""), hold.token, head.request_id
            )
            head.grant = self._grant_of(key, hold, now, waited=now - head.enqueued)
            handoffs.append((head, head.grant))
        if not res.waiters:  # every way out of a queue ends here
            self._waiting.discard(key)
        if not (res.holds or res.waiters) and self._resources.get(key) is res:
            self._forget(key, now)
        return handoffs

    def _grant_of(self, key: Key, hold: Hold, now: float, waited: float) -> Grant:
        return Grant(
            name=key[1],
            owner=hold.owner,
            token=hold.token,
            count=hold.count,
            ttl=max(0.0, hold.expires - now),
            waited=waited,
        )

    def _remembered(self, request_key: RequestKey) -> int | None:
        if not request_key[-1]:
            return None
        entry = self._requests.get(request_key)
        return None if entry is None else entry[0]

    def _remember(self, request_key: RequestKey, value: int, request_id: str | None) -> None:
        if request_id is None:
            return
        self._requests.pop(request_key, None)  # kept in order of writing, for pruning
        self._requests[request_key] = (value, self._now)
        self._new_requests.append((request_key, value))
        while len(self._requests) > MAX_REMEMBERED_REQUESTS:
            self._requests.popitem(last=False)


def _add_bounded(records: dict[T, None] | None, item: T) -> dict[T, None]:
    """``records`` (made if None) with ``item`` added last, the oldest dropped past the bound."""
    if records is None:
        records = {}
    records.pop(item, None)
    records[item] = None
    while len(records) > MAX_NAME_RECORDS:
        del records[next(iter(records))]
    return records


def _copy(hold: Hold) -> Hold:
    """A copy for the writer: its leases as they are now (a session's id never changes)."""
    own = None if hold.own is None else Lease(hold.own.ttl, hold.own.expires)
    return Hold(hold.key, hold.owner, hold.token, hold.count, own, hold.sessions, hold.limit,
                hold.granted, hold.acquired_at)  # fmt: skip
