"""Unit tests of the pure lock table (``lockd._core.LockTable``): no I/O, hand-picked clocks.

Every clock value below is a reading of the store's monotonic clock passed in by hand, so
each expectation is exact. ``WALL`` is the display-only wall clock.
"""

from __future__ import annotations

import copy

import pytest

from lockd._core import (
    MAX_NAME_RECORDS,
    Changes,
    Hold,
    Key,
    LockTable,
    NameRecord,
    RequestKey,
    Waiter,
)
from lockd.errors import InvalidRequest, LockLost, NotHeld, Revoked
from lockd.model import Grant, ResourceInfo

NS = "default"
A: Key = (NS, "a")
B: Key = (NS, "b")
WALL = 1_700_000_000.0

Table = LockTable[str]


def holders(table: Table, key: Key, now: float) -> list[tuple[str, int, int, float]]:
    """(owner, token, count, ttl_left) of every holder of ``key`` at ``now``."""
    info = table.inspect(key, now, WALL)
    return [(h.owner, h.token, h.count, h.ttl_left) for h in info.holders]


def waiter(
    key: Key, owner: str, now: float, ttl: float = 10.0, rid: str | None = None
) -> Waiter[str]:
    return Waiter(key, owner, ttl, now, f"wake-{owner}", rid, WALL)


def queue(table: Table, key: Key, owner: str, now: float, ttl: float = 10.0) -> Waiter[str]:
    """Ask for ``key`` as ``owner``; the test expects a denial, then queues the owner."""
    assert table.acquire(key, owner, ttl, 1, now, WALL) is None
    w = waiter(key, owner, now, ttl)
    assert table.enqueue(w) is None
    return w


# --- grant and deny ---------------------------------------------------------------------------


def test_grant_then_deny_a_second_owner() -> None:
    table: Table = LockTable()
    grant = table.acquire(A, "alice", 5.0, 1, 100.0, WALL)
    assert grant == Grant(name="a", owner="alice", token=1, count=1, ttl=5.0, waited=0.0)
    assert table.acquire(A, "bob", 5.0, 1, 101.0, WALL) is None
    assert holders(table, A, 101.0) == [("alice", 1, 1, 4.0)]
    # Another name is independent, and tokens come from the one table-wide counter.
    other = table.acquire(B, "bob", 5.0, 1, 101.0, WALL)
    assert other is not None
    assert other.token == 2
    assert table.last_token == 2


def test_semaphore_grants_up_to_its_limit() -> None:
    table: Table = LockTable()
    first = table.acquire(A, "o1", 5.0, 2, 0.0, WALL)
    second = table.acquire(A, "o2", 5.0, 2, 0.0, WALL)
    assert first is not None
    assert second is not None
    assert (first.token, second.token) == (1, 2)
    assert table.acquire(A, "o3", 5.0, 2, 0.0, WALL) is None
    info = table.inspect(A, 0.0, WALL)
    assert info.limit == 2
    assert [h.owner for h in info.holders] == ["o1", "o2"]


def test_hold_ends_exactly_at_its_ttl() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 2.0, 1, 10.0, WALL) is not None
    assert table.acquire(A, "bob", 2.0, 1, 11.75, WALL) is None  # 0.25 s left
    grant = table.acquire(A, "bob", 2.0, 1, 12.0, WALL)  # expires <= now: gone
    assert grant is not None
    assert grant.owner == "bob"
    assert grant.token == 2
    assert holders(table, A, 12.0) == [("bob", 2, 1, 2.0)]


# --- FIFO handoff -----------------------------------------------------------------------------


def test_release_hands_off_in_fifo_order() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    w_bob = queue(table, A, "bob", 1.0, ttl=3.0)
    w_carol = queue(table, A, "carol", 2.0, ttl=4.0)
    assert [w.owner for w in table.inspect(A, 2.0, WALL).waiters] == ["bob", "carol"]

    count, handoffs = table.release(A, "alice", 1, 2.5)
    assert count == 0
    assert handoffs == [
        (w_bob, Grant(name="a", owner="bob", token=2, count=1, ttl=3.0, waited=1.5))
    ]
    assert holders(table, A, 2.5) == [("bob", 2, 1, 3.0)]
    assert [w.owner for w in table.inspect(A, 2.5, WALL).waiters] == ["carol"]

    count, handoffs = table.release(A, "bob", 2, 3.0)
    assert count == 0
    assert handoffs == [
        (w_carol, Grant(name="a", owner="carol", token=3, count=1, ttl=4.0, waited=1.0))
    ]
    count, handoffs = table.release(A, "carol", 3, 3.0)
    assert (count, handoffs) == (0, [])
    assert not table.inspect(A, 3.0, WALL).locked


def test_reentrant_release_keeps_the_hold_and_the_queue() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    again = table.acquire(A, "alice", 5.0, 1, 0.0, WALL)
    assert again is not None
    assert (again.token, again.count) == (1, 2)
    w_bob = queue(table, A, "bob", 0.0)
    assert table.release(A, "alice", 1, 1.0) == (1, [])
    count, handoffs = table.release(A, "alice", 1, 1.0)
    assert count == 0
    assert [(w, g.owner, g.token) for w, g in handoffs] == [(w_bob, "bob", 2)]


def test_dequeued_waiter_lets_the_next_one_in() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "o1", 5.0, 2, 0.0, WALL) is not None
    assert table.acquire(A, "o2", 5.0, 2, 0.0, WALL) is not None
    assert table.acquire(A, "o3", 5.0, 2, 0.0, WALL) is None
    w3 = Waiter(A, "o3", 5.0, 0.0, "wake-3", None, WALL)
    w4 = Waiter(A, "o4", 5.0, 0.0, "wake-4", None, WALL)
    table.enqueue(w3)
    table.enqueue(w4)
    count, handoffs = table.release(A, "o1", None, 1.0)
    assert count == 0
    assert [w.owner for w, _ in handoffs] == ["o3"]
    assert table.dequeue(w4, 1.5) == []  # o4 gives up while both slots are taken
    assert table.inspect(A, 1.5, WALL).waiters == ()
    assert table.dequeue(w4, 1.5) == []  # leaving twice is harmless


# --- expiry-driven handoff --------------------------------------------------------------------


def test_expire_hands_off_to_the_head_of_the_queue() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL) is not None
    w_bob = queue(table, A, "bob", 0.25, ttl=2.0)
    queue(table, A, "carol", 0.5)
    assert table.next_expiry(A) == 1.0
    assert table.expire(0.75) == []
    assert holders(table, A, 0.75) == [("alice", 1, 1, 0.25)]
    handoffs = table.expire(1.0)
    assert handoffs == [
        (w_bob, Grant(name="a", owner="bob", token=2, count=1, ttl=2.0, waited=0.75))
    ]
    assert holders(table, A, 1.0) == [("bob", 2, 1, 2.0)]
    assert table.next_expiry(A) == 3.0
    # The lost holder's release and extend say "lost", not "not held".
    with pytest.raises(LockLost):
        table.release(A, "alice", 1, 1.0)
    with pytest.raises(LockLost):
        table.extend(A, "alice", 1, 5.0, 1.0)


def test_expire_forgets_idle_resources() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 1.0, 3, 0.0, WALL) is not None
    assert table.expire(5.0) == []
    assert table.names(NS, "", 5.0) == []
    # Forgotten: a new limit is accepted.
    assert table.acquire(A, "bob", 1.0, 1, 5.0, WALL) is not None
    assert table.inspect(A, 5.0, WALL).limit == 1


def test_expiry_noticed_by_another_call_still_hands_off() -> None:
    """A hold that ends while others wait frees its slot for the queue, whoever notices.

    Core rule: "Whenever a slot frees (release, expiry, ...) queued waiters are granted
    in order, inside the same step". Here the expiry is first noticed by an admin's
    inspect: bob, queued first, gets the hold in that step, and the handoff waits in
    ``take_handoffs`` for the backend to deliver.
    """
    table: Table = LockTable()
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL) is not None
    w_bob = queue(table, A, "bob", 0.5)
    info = table.inspect(A, 2.0, WALL)  # alice's hold ended at 1.0
    assert [(h.owner, h.token) for h in info.holders] == [("bob", 2)]
    assert info.last_token == 2
    handoffs = table.take_handoffs()
    assert [(w, g.owner, g.token) for w, g in handoffs] == [(w_bob, "bob", 2)]
    assert holders(table, A, 2.0) == [("bob", 2, 1, 10.0)]


def test_expiry_noticed_by_a_denied_arrival_still_hands_off() -> None:
    """Same rule when the expiry is noticed by a newcomer's acquire (denied: FIFO)."""
    table: Table = LockTable()
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL) is not None
    w_bob = queue(table, A, "bob", 0.5)
    assert table.acquire(A, "carol", 1.0, 1, 2.0, WALL) is None  # bob is ahead of carol
    handoffs = table.expire(2.0)
    assert [(w, g.owner) for w, g in handoffs] == [(w_bob, "bob")]
    assert [h.owner for h in table.inspect(A, 2.0, WALL).holders] == ["bob"]


# --- reentrancy -------------------------------------------------------------------------------


def test_reentrant_acquire_never_moves_expiry_earlier() -> None:
    table: Table = LockTable()
    first = table.acquire(A, "alice", 10.0, 1, 0.0, WALL)
    assert first is not None
    shorter = table.acquire(A, "alice", 1.0, 1, 2.0, WALL)
    assert shorter == Grant(name="a", owner="alice", token=1, count=2, ttl=8.0, waited=0.0)
    assert holders(table, A, 4.0) == [("alice", 1, 2, 6.0)]
    longer = table.acquire(A, "alice", 20.0, 1, 5.0, WALL)
    assert longer == Grant(name="a", owner="alice", token=1, count=3, ttl=20.0, waited=0.0)
    assert holders(table, A, 24.0) == [("alice", 1, 3, 1.0)]
    assert table.acquire(A, "bob", 1.0, 1, 24.0, WALL) is None
    assert table.last_token == 1


def test_reentrant_acquire_is_granted_even_with_waiters() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    queue(table, A, "bob", 0.0)
    again = table.acquire(A, "alice", 5.0, 1, 1.0, WALL)
    assert again is not None
    assert (again.token, again.count) == (1, 2)


def test_extend_sets_expiry_from_now_and_keeps_the_token() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 4.0, 1, 0.0, WALL) is not None
    grant = table.extend(A, "alice", 1, 10.0, 3.0)
    assert grant == Grant(name="a", owner="alice", token=1, count=1, ttl=10.0, waited=0.0)
    assert holders(table, A, 12.0) == [("alice", 1, 1, 1.0)]
    shorter = table.extend(A, "alice", None, 0.5, 12.0)  # extend may also shorten
    assert shorter.ttl == 0.5
    assert holders(table, A, 12.5) == []


# --- limit mismatch ---------------------------------------------------------------------------


def test_limit_mismatch_is_refused_and_changes_nothing() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    w_bob = queue(table, A, "bob", 0.0)
    table.take_changes()
    before = table.inspect(A, 1.0, WALL)

    with pytest.raises(InvalidRequest) as info:
        table.acquire(A, "carol", 5.0, 2, 1.0, WALL, request_id="r1")
    assert info.value.name == "a"
    assert "limit 1" in str(info.value)
    with pytest.raises(InvalidRequest):
        table.acquire(A, "alice", 5.0, 3, 1.0, WALL)  # even the holder cannot change it

    assert table.inspect(A, 1.0, WALL) == before
    assert not table.take_changes()
    assert table.last_token == 1
    # The refused request id was not remembered: a correct retry is a fresh request.
    assert table.acquire(A, "carol", 5.0, 1, 1.0, WALL, request_id="r1") is None
    # Once nobody holds or waits, the name takes a new limit.
    table.dequeue(w_bob, 1.0)
    assert table.release(A, "alice", 1, 1.0) == (0, [])
    assert table.acquire(A, "carol", 5.0, 2, 1.0, WALL) is not None
    assert table.inspect(A, 1.0, WALL).limit == 2


def test_handed_off_hold_keeps_the_limit() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 1.0, 1, 0.0, WALL) is not None
    queue(table, A, "bob", 0.0)
    assert table.release(A, "alice", 1, 0.5)[0] == 0  # bob now holds
    with pytest.raises(InvalidRequest):
        table.acquire(A, "carol", 1.0, 2, 0.5, WALL)


# --- release and extend errors ----------------------------------------------------------------


def test_release_error_kinds() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None  # token 1
    assert table.acquire(B, "bob", 5.0, 1, 0.0, WALL) is not None  # token 2
    evicted, handoffs = table.force_release(A, None, 1.0)
    assert [(h.owner, h.token) for h in evicted] == [("alice", 1)]
    assert handoffs == []
    table.take_changes()

    with pytest.raises(Revoked) as revoked:
        table.release(A, "alice", 1, 1.0)
    assert (revoked.value.name, revoked.value.owner, revoked.value.token) == ("a", "alice", 1)
    with pytest.raises(Revoked):
        table.extend(A, "alice", 1, 5.0, 1.0)

    assert table.release(B, "bob", 2, 1.0) == (0, [])
    table.take_changes()
    with pytest.raises(LockLost) as lost:
        table.release(B, "bob", 2, 1.0)  # token 2 was issued: the hold ended
    assert type(lost.value) is LockLost
    assert lost.value.token == 2

    with pytest.raises(NotHeld) as not_held:
        table.release(A, "carol", 99, 1.0)  # never issued
    assert type(not_held.value) is NotHeld
    with pytest.raises(NotHeld) as no_token:
        table.release(A, "carol", None, 1.0)
    assert type(no_token.value) is NotHeld
    assert not table.take_changes()  # failed calls change nothing


def test_only_the_holder_releases_or_extends() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    table.take_changes()
    with pytest.raises(NotHeld):
        table.release(A, "mallory", 1, 1.0)  # alice's token, wrong owner
    with pytest.raises(NotHeld) as err:
        table.extend(A, "mallory", None, 100.0, 1.0)
    assert type(err.value) is NotHeld
    with pytest.raises(NotHeld):
        table.release(A, "alice", 7, 1.0)  # right owner, token never issued
    assert holders(table, A, 1.0) == [("alice", 1, 1, 4.0)]
    assert not table.take_changes()


def test_force_release_of_one_owner_hands_off_and_revokes() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "o1", 5.0, 2, 0.0, WALL) is not None
    assert table.acquire(A, "o2", 5.0, 2, 0.0, WALL) is not None
    assert table.acquire(A, "o3", 5.0, 2, 0.0, WALL) is None
    w3 = Waiter(A, "o3", 5.0, 0.0, "wake-3", None, WALL)
    table.enqueue(w3)
    evicted, handoffs = table.force_release(A, "o2", 1.0)
    assert [(h.owner, h.token) for h in evicted] == [("o2", 2)]
    assert [(w, g.token) for w, g in handoffs] == [(w3, 3)]
    assert [h.owner for h in table.inspect(A, 1.0, WALL).holders] == ["o1", "o3"]
    changes = table.take_changes()
    record = changes.names[A]
    assert record is not None
    assert (list(record.revoked), list(record.evicted)) == ([2], ["o2"])
    with pytest.raises(Revoked):
        table.extend(A, "o2", 2, 5.0, 1.0)
    assert table.force_release(B, None, 1.0) == ([], [])


# --- request ids ------------------------------------------------------------------------------


def test_acquire_request_id_applies_once() -> None:
    table: Table = LockTable()
    first = table.acquire(A, "alice", 5.0, 1, 0.0, WALL, request_id="r1")
    retry = table.acquire(A, "alice", 5.0, 1, 1.0, WALL, request_id="r1")
    assert first is not None
    assert retry is not None
    assert (first.token, first.count) == (1, 1)
    assert (retry.token, retry.count) == (1, 1)  # not counted twice
    assert retry.ttl == 4.0  # the same hold, 1 s later
    other = table.acquire(A, "alice", 5.0, 1, 1.0, WALL, request_id="r2")
    assert other is not None
    assert other.count == 2
    # A request id belongs to its owner and name.
    bob = table.acquire(B, "bob", 5.0, 1, 1.0, WALL, request_id="r1")
    assert bob is not None
    assert (bob.owner, bob.token, bob.count) == ("bob", 2, 1)
    # After the hold ends, a late retry must not create a new grant.
    assert table.release(A, "alice", 1, 2.0)[0] == 1
    assert table.release(A, "alice", 1, 2.0)[0] == 0
    with pytest.raises(LockLost):
        table.acquire(A, "alice", 5.0, 1, 3.0, WALL, request_id="r1")
    assert not table.inspect(A, 3.0, WALL).locked
    assert table.last_token == 2


def test_release_request_id_applies_once() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    assert table.release(A, "alice", 1, 1.0, request_id="x") == (1, [])
    assert table.release(A, "alice", 1, 1.0, request_id="x") == (1, [])
    assert holders(table, A, 1.0) == [("alice", 1, 1, 4.0)]
    assert table.release(A, "alice", 1, 1.0, request_id="y") == (0, [])
    assert table.release(A, "alice", 1, 1.0, request_id="y") == (0, [])  # no error
    assert not table.inspect(A, 1.0, WALL).locked


def test_failed_release_is_not_remembered() -> None:
    table: Table = LockTable()
    with pytest.raises(NotHeld):
        table.release(A, "alice", None, 0.0, request_id="x")
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    assert table.release(A, "alice", None, 0.0, request_id="x") == (0, [])


def test_handoff_remembers_the_waiters_request_id() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    assert table.acquire(A, "bob", 5.0, 1, 0.0, WALL, request_id="rb") is None
    table.enqueue(waiter(A, "bob", 0.0, ttl=5.0, rid="rb"))
    _, handoffs = table.release(A, "alice", 1, 1.0)
    assert [g.token for _, g in handoffs] == [2]
    retry = table.acquire(A, "bob", 5.0, 1, 1.5, WALL, request_id="rb")
    assert retry is not None
    assert (retry.token, retry.count) == (2, 1)


def test_enqueue_retry_keeps_its_place() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    first = waiter(A, "bob", 0.0, rid="rb")
    table.enqueue(first)
    table.enqueue(waiter(A, "carol", 0.1))
    retried = waiter(A, "bob", 0.2, rid="rb")
    assert table.enqueue(retried) is first
    assert [w.owner for w in table.inspect(A, 0.2, WALL).waiters] == ["bob", "carol"]
    _, handoffs = table.release(A, "alice", 1, 1.0)
    assert [w for w, _ in handoffs] == [retried]


# --- take_changes -----------------------------------------------------------------------------


def test_take_changes_reports_exactly_what_changed() -> None:
    table: Table = LockTable()
    assert not table.take_changes()

    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL, request_id="r1") is not None
    changes = table.take_changes()
    assert set(changes.holds) == {(NS, "a", "alice")}
    hold = changes.holds[(NS, "a", "alice")]
    assert hold is not None
    assert hold.own is not None
    assert (hold.owner, hold.token, hold.count, hold.own.ttl, hold.limit) == ("alice", 1, 1, 5.0, 1)
    assert hold.acquired_at == WALL
    assert changes.last_token == 1
    assert set(changes.names) == {A}
    assert changes.requests == [(("acquire", NS, "a", "alice", "r1"), 1)]
    assert not table.take_changes()  # taken: cleared

    assert table.acquire(A, "alice", 7.0, 1, 1.0, WALL) is not None  # reentrant
    changes = table.take_changes()
    assert changes.last_token is None  # no new token
    reentered = changes.holds[(NS, "a", "alice")]
    assert reentered is not None
    assert reentered.count == 2
    assert changes.requests == []  # no request id given

    table.extend(A, "alice", 1, 3.0, 2.0)
    assert set(table.take_changes().holds) == {(NS, "a", "alice")}

    assert table.release(A, "alice", 1, 2.0, request_id="x") == (1, [])
    changes = table.take_changes()
    assert changes.requests == [(("release", NS, "a", "alice", "x"), 1)]
    assert table.release(A, "alice", 1, 2.0) == (0, [])
    changes = table.take_changes()
    assert changes.holds == {(NS, "a", "alice"): None}
    assert changes.last_token is None

    assert table.acquire(B, "bob", 1.0, 1, 3.0, WALL) is not None
    table.take_changes()
    table.inspect(B, 4.0, WALL)  # notices the expiry
    assert table.take_changes().holds == {(NS, "b", "bob"): None}

    assert table.acquire(B, "bob", 1.0, 1, 5.0, WALL) is not None
    table.force_release(B, None, 5.0)
    changes = table.take_changes()
    assert changes.holds == {(NS, "b", "bob"): None}
    assert changes.last_token == 3
    record = changes.names[B]
    assert record is not None
    assert (record.last_token, list(record.revoked), list(record.evicted)) == (3, [3], ["bob"])


def test_changes_is_falsy_only_when_empty() -> None:
    assert not Changes({}, {}, None, [], {})
    assert Changes({}, {}, 0, [], {})
    assert Changes({}, {}, None, [(("release", NS, "a", "o", "r"), 0)], {})
    assert Changes({(NS, "a", "o"): None}, {}, None, [], {})
    assert Changes({}, {"s": None}, None, [], {})
    assert Changes({}, {}, None, [], {(NS, "a"): None})


# --- restore ----------------------------------------------------------------------------------


def _persisted(
    table: Table,
) -> tuple[list[tuple[Key, Hold]], int, dict[Key, NameRecord], list[tuple[RequestKey, int]]]:
    """What the file store would hold on disk: every change since the table was made."""
    changes = table.take_changes()
    kept = [
        ((ns, name), copy.copy(hold))
        for (ns, name, _), hold in changes.holds.items()
        if hold is not None
    ]
    names = {key: record for key, record in changes.names.items() if record is not None}
    return kept, changes.last_token or 0, names, list(changes.requests)


def test_restore_gives_every_hold_its_full_ttl() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL, request_id="r1") is not None
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None  # count 2
    assert table.acquire(B, "o1", 3.0, 2, 0.0, WALL) is not None
    assert table.acquire(B, "o2", 3.0, 2, 1.0, WALL) is not None
    assert table.acquire((NS, "c"), "zed", 1.0, 1, 1.0, WALL) is not None
    table.force_release((NS, "c"), None, 1.5)  # token 4 revoked
    holds, last_token, names, requests = _persisted(table)
    assert last_token == 4
    assert list(names[(NS, "c")].revoked) == [4]

    restored: Table = LockTable()
    restored.restore(holds, last_token, requests, now=500.0, names=names)
    assert holders(restored, A, 500.0) == [("alice", 1, 2, 5.0)]
    info: ResourceInfo = restored.inspect(B, 500.0, WALL)
    assert info.limit == 2
    assert [(h.owner, h.token, h.ttl_left, h.held_for) for h in info.holders] == [
        ("o1", 2, 3.0, 0.0),
        ("o2", 3, 3.0, 0.0),
    ]
    # Safety: nobody else gets in before the full ttl; liveness: it ends at the full ttl.
    assert restored.acquire(A, "bob", 1.0, 1, 504.75, WALL) is None
    assert restored.acquire(B, "o3", 1.0, 2, 502.75, WALL) is None
    bob = restored.acquire(A, "bob", 1.0, 1, 505.0, WALL)
    assert bob is not None
    assert bob.token == 5  # the counter went on from the persisted last token
    # Remembered requests and revocations survive too.
    with pytest.raises(LockLost):
        restored.acquire(A, "alice", 5.0, 1, 505.0, WALL, request_id="r1")
    with pytest.raises(Revoked):
        restored.release((NS, "c"), "zed", 4, 505.0)


def test_restore_keeps_a_higher_counter() -> None:
    table: Table = LockTable()
    for owner in ("a", "b", "c"):
        assert table.acquire((NS, owner), owner, 1.0, 1, 0.0, WALL) is not None
    table.restore([], 1, [], now=0.0)
    assert table.last_token == 3


def test_restore_never_shortens_a_reentered_hold() -> None:
    """A restart "never shortens a hold" (LockTable.restore's promise).

    alice holds until t=60; at t=0 she re-enters with ttl 1, which keeps her expiry at 60
    (reentrancy never moves expiry earlier). After a restart at t=0.5 her hold must still
    last at least until the 60 it had, so bob must not get in at t=2.
    """
    table: Table = LockTable()
    assert table.acquire(A, "alice", 60.0, 1, 0.0, WALL) is not None
    again = table.acquire(A, "alice", 1.0, 1, 0.0, WALL)
    assert again is not None
    assert again.ttl == 60.0
    holds, last_token, names, requests = _persisted(table)

    restored: Table = LockTable()
    restored.restore(holds, last_token, requests, now=0.5, names=names)
    assert restored.acquire(A, "bob", 1.0, 1, 2.0, WALL) is None
    ttl_left = restored.inspect(A, 2.0, WALL).holders[0].ttl_left
    assert ttl_left >= 58.0


# --- per-name judgement and pruning -----------------------------------------------------------


def test_wrong_tokens_and_evicted_owners_are_judged_per_name() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None  # token 1
    table.force_release(A, None, 0.0)
    assert table.acquire(B, "bob", 5.0, 1, 0.0, WALL) is not None  # token 2
    table.take_changes()
    with pytest.raises(Revoked):
        table.release(A, "alice", 1, 0.0)
    with pytest.raises(Revoked):
        table.release(A, "alice", None, 0.0)  # no token: alice was evicted from A
    # B never issued token 1 as a hold of its own, but 1 <= its last: an ended token.
    with pytest.raises(LockLost):
        table.release(B, "alice", 1, 0.0)
    with pytest.raises(NotHeld) as other_name:
        table.release(B, "alice", None, 0.0)
    assert type(other_name.value) is NotHeld  # evicted from A, not from B
    with pytest.raises(NotHeld) as live:
        table.release(B, "alice", 2, 0.0)  # bob's live token
    assert type(live.value) is NotHeld
    with pytest.raises(NotHeld) as above:
        table.release(A, "alice", 2, 0.0)  # above A's last token
    assert type(above.value) is NotHeld
    assert not table.take_changes()
    # A new grant of A to alice clears her eviction.
    assert table.acquire(A, "alice", 5.0, 1, 1.0, WALL) is not None
    assert table.release(A, "alice", None, 1.0)[0] == 0
    with pytest.raises(NotHeld) as cleared:
        table.release(A, "alice", None, 1.0)
    assert type(cleared.value) is NotHeld


def test_name_records_are_bounded() -> None:
    table: Table = LockTable()
    for i in range(MAX_NAME_RECORDS + 5):
        assert table.acquire(A, f"o{i}", 5.0, 1, 0.0, WALL) is not None
        table.force_release(A, None, 0.0)
    record = table.take_changes().names[A]
    assert record is not None
    assert len(record.revoked) == len(record.evicted) == MAX_NAME_RECORDS
    assert next(iter(record.evicted)) == "o5"  # the oldest went first


def test_idle_names_are_pruned_after_the_retention_and_tokens_go_on() -> None:
    table: Table = LockTable(retention=10.0)
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None  # token 1
    assert table.acquire(B, "bob", 100.0, 1, 0.0, WALL) is not None  # token 2, held on
    assert table.release(A, "alice", 1, 1.0)[0] == 0  # A idle from t=1
    table.take_changes()
    table.expire(10.5)
    assert table.sizes()["names"] == 2
    with pytest.raises(LockLost):
        table.release(A, "alice", 1, 10.5)
    table.expire(11.0)
    assert table.sizes() == {"resources": 1, "names": 1, "requests": 0, "sessions": 0}
    assert table.take_changes().names == {A: None}
    with pytest.raises(NotHeld) as late:
        table.release(A, "alice", 1, 11.0)
    assert type(late.value) is NotHeld
    assert table.inspect(A, 11.0, WALL).last_token == 0
    again = table.acquire(A, "alice", 5.0, 1, 11.0, WALL)
    assert again is not None
    assert again.token == 3  # above every earlier token of A, though A's record was gone
    # A name with waiters is not idle either, however long it waits.
    assert table.acquire(B, "carol", 5.0, 1, 11.0, WALL) is None
    table.enqueue(waiter(B, "carol", 11.0))
    table.expire(50.0)
    assert table.inspect(B, 50.0, WALL).last_token == 2


def test_request_ids_are_forgotten_after_the_retention() -> None:
    table: Table = LockTable(retention=10.0)
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL, request_id="r1") is not None
    assert table.release(A, "alice", 1, 1.0, request_id="x") == (0, [])
    table.expire(9.0)
    assert table.release(A, "alice", 1, 9.0, request_id="x") == (0, [])  # remembered
    table.expire(10.0)  # r1 was written at 0: gone; x at 1: kept
    assert table.sizes()["requests"] == 1
    table.expire(11.0)
    assert table.sizes()["requests"] == 0
    with pytest.raises(NotHeld):  # a new request now (and A's record went with it)
        table.release(A, "alice", 1, 11.0, request_id="x")


def test_restore_with_the_wall_clock_keeps_held_for() -> None:
    table: Table = LockTable()
    assert table.acquire(A, "alice", 5.0, 1, 0.0, WALL) is not None
    holds, last_token, names, requests = _persisted(table)
    restored: Table = LockTable()
    restored.restore(holds, last_token, requests, now=500.0, names=names, wall=WALL + 30.0)
    (holder,) = restored.inspect(A, 501.0, WALL).holders
    assert (holder.acquired_at, holder.held_for, holder.ttl_left) == (WALL, 31.0, 4.0)
