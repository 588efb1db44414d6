"""Unit tests of the lock table's sessions: leases that many holds and waiters share.

Hand-picked clock readings as in ``test_core.py``; each test names the rule it checks.
"""

from __future__ import annotations

import copy

import pytest

from lockd._core import Hold, Key, LockTable, Outcome, Waiter
from lockd.errors import InvalidRequest, LockLost, NotHeld, SessionLost
from lockd.model import Grant
from tests.conformance.helpers import ttls
from tests.test_core import WALL, A, B, Table, holders

C: Key = ("default", "c")


def session_waiter(
    table: Table, key: Key, owner: str, sid: str, ttl: float, now: float
) -> Waiter[str]:
    """Queue ``owner`` on ``key`` in session ``sid`` (the test expects a denial first)."""
    assert table.acquire(key, owner, ttl, 1, now, WALL, session_id=sid) is None
    w = Waiter(key, owner, ttl, now, f"wake-{owner}", None, WALL,
               session=table.session(sid, ttl, now))  # fmt: skip
    assert table.enqueue(w) is None
    return w


def granted(handoffs: list[tuple[Waiter[str], Outcome]]) -> list[tuple[str, int]]:
    """(owner, token) of each waiter handed a grant, in order."""
    return [(w.owner, o.token) for w, o in handoffs if isinstance(o, Grant)]


def told_lost(handoffs: list[tuple[Waiter[str], Outcome]]) -> list[str]:
    """Owners of the waiters told that their session ended."""
    return [w.owner for w, o in handoffs if isinstance(o, SessionLost)]


# --- opening and keeping alive ----------------------------------------------------------------


def test_a_session_lease_is_shared_and_renewed_by_one_keepalive() -> None:
    table: Table = LockTable()
    table.open_session("s", 10.0, 0.0)
    for key in (A, B, C):
        assert table.acquire(key, "alice", 10.0, 1, 1.0, WALL, session_id="s") is not None
    # Every hold reads the session's lease, not a lease of its own from its grant.
    assert holders(table, C, 4.0) == [("alice", 3, 1, 6.0)]
    assert ttls(table.keepalive(["s"], 8.0)) == [10.0]
    assert [holders(table, key, 17.5)[0][3] for key in (A, B, C)] == [0.5, 0.5, 0.5]
    assert table.acquire(A, "bob", 1.0, 1, 17.9, WALL) is None  # still alice's


def test_opening_a_session_twice_under_one_id_is_refused() -> None:
    table: Table = LockTable()
    table.open_session("s", 10.0, 0.0)
    with pytest.raises(InvalidRequest, match="exists"):
        table.open_session("s", 5.0, 1.0)
    assert ttls(table.keepalive(["s"], 2.0)) == [10.0]  # the first is untouched


def test_keepalive_answers_none_for_an_unknown_or_ended_session_and_never_revives_one() -> None:
    table: Table = LockTable()
    table.open_session("s", 1.0, 0.0)
    table.open_session("t", 5.0, 0.0)
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL, session_id="s") is not None
    assert ttls(table.keepalive(["s", "nope", "t"], 1.0)) == [None, None, 5.0]  # s expired at 1.0
    assert ttls(table.keepalive(["s"], 1.1)) == [None]
    assert holders(table, A, 1.1) == []


def test_a_keepalive_tells_each_session_of_its_holds_that_ended_otherwise() -> None:
    table: Table = LockTable()
    table.open_session("a", 10.0, 0.0)
    table.open_session("b", 10.0, 0.0)
    for sid in ("a", "b"):
        assert table.acquire(A, "job", 10.0, 1, 0.0, WALL, session_id=sid) is not None
    assert table.acquire(B, "me", 10.0, 1, 0.0, WALL, session_id="a") is not None
    assert table.acquire(C, "me", 10.0, 1, 0.0, WALL, session_id="a") is not None
    table.force_release(B, None, 1.0)
    assert table.release(C, "me", 3, 1.0, session_id="a")[0] == 0  # a's own: not told
    assert table.release(A, "job", 1, 1.0, session_id="a")[0] == 1
    assert table.release(A, "job", 1, 1.0)[0] == 0  # the last count, not naming b
    answers = table.keepalive(["a", "b"], 2.0)
    told = [[(e.name, e.token, e.reason) for e in a.ended] for a in answers if a is not None]
    assert told == [[("b", 2, "revoked")], [("a", 1, "released")]]
    assert [a.ended for a in table.keepalive(["a", "b"], 3.0) if a is not None] == [(), ()]


# --- the end of a session ---------------------------------------------------------------------


def test_an_expired_session_ends_every_hold_at_once_and_the_queues_move_on() -> None:
    table: Table = LockTable()
    table.open_session("s", 2.0, 0.0)
    for key in (A, B):
        assert table.acquire(key, "alice", 2.0, 1, 0.0, WALL, session_id="s") is not None
    queued = [Waiter(key, "bob", 5.0, 0.5, f"wake-{key[1]}", None, WALL) for key in (A, B)]
    for key, w in zip((A, B), queued, strict=True):
        assert table.acquire(key, "bob", 5.0, 1, 0.5, WALL) is None
        assert table.enqueue(w) is None
    assert table.expire(1.9) == []
    handoffs = table.expire(2.0)  # the sweep ends the session
    assert granted(handoffs) == [("bob", 3), ("bob", 4)]
    assert {w.key for w, _ in handoffs} == {A, B}
    assert table.sizes()["sessions"] == 0
    with pytest.raises(LockLost):
        table.release(A, "alice", 1, 2.0)


def test_a_hold_of_an_expired_session_is_gone_before_any_sweep() -> None:
    table: Table = LockTable()
    table.open_session("s", 2.0, 0.0)
    assert table.acquire(A, "alice", 2.0, 1, 0.0, WALL, session_id="s") is not None
    grant = table.acquire(A, "bob", 1.0, 1, 2.0, WALL)  # no sweep ran
    assert grant is not None
    assert grant.token == 2


def test_a_revoked_session_releases_its_holds_and_tells_its_waiters() -> None:
    table: Table = LockTable()
    table.open_session("s", 30.0, 0.0)
    table.open_session("t", 30.0, 0.0)
    assert table.acquire(A, "alice", 30.0, 1, 0.0, WALL, session_id="s") is not None
    assert table.acquire(B, "carol", 30.0, 1, 0.0, WALL) is not None
    session_waiter(table, B, "alice", "s", 30.0, 1.0)
    session_waiter(table, A, "bob", "t", 30.0, 1.0)
    handoffs = table.revoke_session("s", 2.0)
    assert granted(handoffs) == [("bob", 3)]
    assert told_lost(handoffs) == ["alice"]
    assert table.inspect(B, 2.0, WALL).waiters == ()  # alice left B's queue
    assert holders(table, A, 2.0) == [("bob", 3, 1, 28.0)]  # bob lives by session t
    with pytest.raises(LockLost):  # released, not revoked by an administrator
        table.release(A, "alice", 1, 2.0)
    assert table.revoke_session("s", 3.0) == []  # twice: nothing more


def test_a_waiter_whose_session_expired_is_passed_over_and_told() -> None:
    table: Table = LockTable()
    table.open_session("s", 2.0, 0.0)
    assert table.acquire(A, "alice", 10.0, 1, 0.0, WALL) is not None
    session_waiter(table, A, "bob", "s", 2.0, 0.5)
    carol = Waiter(A, "carol", 10.0, 0.6, "wake-carol", None, WALL)
    assert table.acquire(A, "carol", 10.0, 1, 0.6, WALL) is None
    assert table.enqueue(carol) is None
    _, handoffs = table.release(A, "alice", 1, 3.0)  # bob's session ended at 2.0
    assert told_lost(handoffs) == ["bob"]
    assert granted(handoffs) == [("carol", 2)]


def test_a_call_naming_an_ended_session_gets_session_lost_and_changes_nothing() -> None:
    table: Table = LockTable()
    table.open_session("s", 1.0, 0.0)
    with pytest.raises(SessionLost):
        table.acquire(A, "alice", 1.0, 1, 1.5, WALL, session_id="s")  # it ended at 1.0
    with pytest.raises(SessionLost):
        table.acquire(A, "alice", 1.0, 1, 2.0, WALL, session_id="never")
    assert table.last_token == 0
    assert table.inspect(A, 2.0, WALL).holders == ()


def test_a_ttl_other_than_the_sessions_is_refused() -> None:
    table: Table = LockTable()
    table.open_session("s", 10.0, 0.0)
    with pytest.raises(InvalidRequest, match="does not match"):
        table.acquire(A, "alice", 5.0, 1, 0.0, WALL, session_id="s")
    assert table.last_token == 0


# --- moving between leases --------------------------------------------------------------------


def test_a_hold_lasts_while_any_of_its_leases_does() -> None:
    """A re-entry's session joins the hold's leases; its own lease only ever grows."""
    table: Table = LockTable()
    table.open_session("long", 30.0, 0.0)
    table.open_session("short", 1.0, 0.0)
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None  # its own lease, to 5
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL, session_id="short") is not None
    assert table.acquire(A, "alice", 2.0, 1, 0.0, WALL) is not None  # to 2: not shorter
    assert holders(table, A, 0.0) == [("alice", 1, 3, 5.0)]
    assert table.acquire(A, "alice", 30.0, 1, 1.0, WALL, session_id="long") is not None
    assert ttls(table.keepalive(["long"], 20.0)) == [30.0]
    assert holders(table, A, 20.0) == [("alice", 1, 4, 30.0)]  # by "long", past the rest
    table.revoke_session("long", 21.0)
    assert holders(table, A, 21.0) == []  # its last lease ended


def test_a_shared_owner_is_held_while_either_client_keeps_its_session() -> None:
    """Two clients hold one owner's hold, each by its own session: the hold lasts while
    either session does, and a client that lets go takes its session off the hold."""
    table: Table = LockTable()
    table.open_session("a", 10.0, 0.0)
    table.open_session("b", 10.0, 0.0)
    assert table.acquire(A, "job", 10.0, 1, 0.0, WALL, session_id="a") is not None
    assert table.acquire(A, "job", 10.0, 1, 0.0, WALL, session_id="b") is not None
    assert ttls(table.keepalive(["a"], 8.0)) == [10.0]  # "b" is not kept: it ends at 10
    assert table.expire(12.0) == []
    assert holders(table, A, 12.0) == [("job", 1, 2, 6.0)]  # kept by "a"
    assert table.release(A, "job", 1, 13.0, session_id="a")[0] == 1
    assert holders(table, A, 13.0) == []  # b's count is left, but nothing keeps it


def test_a_release_naming_its_session_leaves_the_others_keeping_the_hold() -> None:
    table: Table = LockTable()
    table.open_session("a", 10.0, 0.0)
    table.open_session("b", 10.0, 0.0)
    for sid in ("a", "b"):
        assert table.acquire(A, "job", 10.0, 1, 0.0, WALL, session_id=sid) is not None
    assert table.release(A, "job", 1, 1.0, session_id="a")[0] == 1
    table.revoke_session("a", 2.0)
    assert holders(table, A, 2.0) == [("job", 1, 1, 8.0)]  # "b" keeps it
    assert table.release(A, "job", 1, 3.0, session_id="b") == (0, [])


def test_extend_adds_a_session_or_sets_the_own_lease() -> None:
    table: Table = LockTable()
    table.open_session("s", 2.0, 0.0)
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL) is not None
    assert table.extend(A, "alice", 1, 2.0, 0.5, session_id="s").ttl == 1.5
    assert ttls(table.keepalive(["s"], 1.5)) == [2.0]
    assert holders(table, A, 3.0) == [("alice", 1, 1, 0.5)]  # by the session, past its own
    assert table.extend(A, "alice", 1, 10.0, 3.0).ttl == 10.0  # its own lease, to 13
    assert table.expire(4.0) == []  # the session ends at 3.5 ...
    assert holders(table, A, 4.0) == [("alice", 1, 1, 9.0)]  # ... and the own lease goes on


def test_extend_into_an_ended_session_changes_nothing() -> None:
    table: Table = LockTable()
    table.open_session("s", 1.0, 0.0)
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    with pytest.raises(SessionLost):
        table.extend(A, "alice", 1, 1.0, 2.0, session_id="s")
    assert holders(table, A, 2.0) == [("alice", 1, 1, 3.0)]


def test_a_queued_grant_lives_by_the_waiters_session() -> None:
    table: Table = LockTable()
    table.open_session("s", 4.0, 0.0)
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL) is not None
    session_waiter(table, A, "bob", "s", 4.0, 0.0)
    assert ttls(table.keepalive(["s"], 3.0)) == [4.0]
    assert granted(table.expire(3.0, A)) == [("bob", 2)]
    assert holders(table, A, 3.0) == [("bob", 2, 1, 4.0)]
    handoffs = table.revoke_session("s", 3.5)
    assert handoffs == []
    with pytest.raises(NotHeld):
        table.release(A, "bob", None, 3.5)


def test_a_retry_that_replaces_a_queued_waiter_leaves_one_in_the_session() -> None:
    table: Table = LockTable()
    table.open_session("s", 10.0, 0.0)
    assert table.acquire(A, "alice", 10.0, 1, 0.0, WALL) is not None
    session = table.session("s", 10.0, 0.0)
    first = Waiter(A, "bob", 10.0, 0.0, "wake-1", "r", WALL, session=session)
    retry = Waiter(A, "bob", 10.0, 1.0, "wake-2", "r", WALL, session=session)
    for w in (first, retry):
        assert table.acquire(A, "bob", 10.0, 1, w.enqueued, WALL, "r", "s") is None
    assert table.enqueue(first) is None
    assert table.enqueue(retry) is first
    assert session.waiters == {retry}
    assert told_lost(table.revoke_session("s", 2.0)) == ["bob"]


# --- persistence ------------------------------------------------------------------------------


def test_sessions_are_noted_for_the_writer_and_a_keepalive_writes_nothing() -> None:
    table: Table = LockTable()
    table.open_session("s", 10.0, 0.0)
    assert table.acquire(A, "alice", 10.0, 1, 0.0, WALL, session_id="s") is not None
    changes = table.take_changes()
    assert changes.sessions == {"s": 10.0}
    hold = changes.holds[(*A, "alice")]
    assert hold is not None
    assert (hold.own, [s.id for s in hold.sessions]) == (None, ["s"])
    ttls(table.keepalive(["s"], 5.0))
    assert not table.take_changes()
    table.revoke_session("s", 6.0)
    changes = table.take_changes()
    assert changes.sessions == {"s": None}
    assert changes.holds == {(*A, "alice"): None}


def test_restore_gives_each_lease_its_full_ttl_and_the_holds_rejoin_their_sessions() -> None:
    table: Table = LockTable()
    table.open_session("s", 10.0, 0.0)
    table.open_session("gone", 10.0, 0.0)
    assert table.acquire(A, "alice", 10.0, 1, 0.0, WALL, session_id="s") is not None
    assert table.acquire(B, "alice", 10.0, 1, 0.0, WALL, session_id="gone") is not None
    assert table.acquire(C, "alice", 3.0, 1, 0.0, WALL) is not None
    assert table.acquire(C, "alice", 10.0, 1, 0.0, WALL, session_id="gone") is not None
    changes = table.take_changes()
    holds: list[tuple[Key, Hold]] = [
        ((ns, name), copy.copy(h)) for (ns, name, _), h in changes.holds.items() if h is not None
    ]
    restored: Table = LockTable()
    # "gone" is not among the sessions read back: it ended before the restart.
    restored.restore(holds, changes.last_token or 0, [], now=100.0, sessions={"s": 10.0})
    assert holders(restored, A, 100.0) == [("alice", 1, 1, 10.0)]
    assert holders(restored, B, 100.0) == []  # kept by "gone" alone: ended with it
    assert holders(restored, C, 100.0) == [("alice", 3, 2, 3.0)]  # by its own lease
    assert ttls(restored.keepalive(["s"], 105.0)) == [10.0]
    assert holders(restored, A, 114.0) == [("alice", 1, 1, 1.0)]  # renewed with its session
    restored.revoke_session("s", 114.0)
    assert holders(restored, A, 114.0) == []


def test_a_sweep_looks_only_at_the_names_whose_own_lease_came_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A million holds in sessions must not cost a million looks per sweep."""
    table: Table = LockTable()
    table.open_session("s", 10.0, 0.0)
    for i in range(100):
        assert table.acquire(("default", f"k{i}"), "o", 10.0, 1, 0.0, WALL, session_id="s")
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL) is not None
    bob = table.acquire(B, "bob", 5.0, 1, 0.0, WALL)
    assert bob is not None
    assert table.extend(B, "bob", bob.token, 5.0, 0.5).ttl == 5.0  # its first expiry: stale
    looked: list[Key | None] = []
    drop_expired = table._drop_expired

    def spy(now: float, key: Key | None = None) -> None:
        looked.append(key)
        drop_expired(now, key)

    monkeypatch.setattr(table, "_drop_expired", spy)
    table.expire(2.0)
    assert looked == [A]
    table.expire(5.2)
    assert looked == [A, B]  # its old expiry came due: looked at, still held
    assert holders(table, B, 5.2) == [("bob", bob.token, 1, pytest.approx(0.3))]
    table.expire(5.5)
    assert looked == [A, B, B]
    assert holders(table, B, 5.5) == []
    assert len(holders(table, ("default", "k7"), 5.5)) == 1
