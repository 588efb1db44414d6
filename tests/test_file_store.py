"""The file store's own persistence: the request-id log, old stores, write failures."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import lockd
from lockd.backends import require_safety
from lockd.backends.file import FileBackend
from tests.conformance.helpers import bqueued, ttls
from tests.faults.filewriter import Gate

NS = "default"


async def opened(path: Path, **options: Any) -> FileBackend:
    """A file store at ``path``, opened."""
    store = FileBackend(path, **options)
    await store.open()
    return store


async def test_request_ids_survive_restart_and_the_later_answer_wins(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    first = await store.acquire(NS, "a", "me", ttl=60, wait=0, request_id="r1")
    await store.aclose()
    db = sqlite3.connect(tmp_path / "lockd.db")
    with db:  # a request id logged twice (forgotten in memory, then answered again)
        db.execute("INSERT INTO request_log VALUES ('acquire', ?, 'b', 'me', 'r2', 7)", (NS,))
        db.execute("INSERT INTO request_log VALUES ('acquire', ?, 'b', 'me', 'r2', 9)", (NS,))
    db.close()

    store = await opened(tmp_path)
    try:
        again = await store.acquire(NS, "a", "me", ttl=60, wait=0, request_id="r1")
        assert again.token == first.token
        assert store._table._requests[("acquire", NS, "b", "me", "r2")][0] == 9
    finally:
        await store.aclose()


async def test_a_store_with_the_keyed_requests_table_is_carried_over(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    grant = await store.acquire(NS, "a", "me", ttl=60, wait=0, request_id="r1")
    await store.aclose()
    db = sqlite3.connect(tmp_path / "lockd.db")
    with db:  # the layout before the log
        db.execute(
            "CREATE TABLE requests (op TEXT NOT NULL, namespace TEXT NOT NULL,"
            " name TEXT NOT NULL, owner TEXT NOT NULL, request_id TEXT NOT NULL,"
            " value INTEGER NOT NULL, PRIMARY KEY (op, namespace, name, owner, request_id))"
        )
        db.execute("INSERT INTO requests SELECT * FROM request_log")
        db.execute("DROP TABLE request_log")
    db.close()

    store = await opened(tmp_path)
    try:
        again = await store.acquire(NS, "a", "me", ttl=60, wait=0, request_id="r1")
        assert again.token == grant.token
    finally:
        await store.aclose()
    db = sqlite3.connect(tmp_path / "lockd.db")
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert "requests" not in tables


async def test_a_failed_write_refuses_the_caller_and_everything_after(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.acquire(NS, "a", "me", ttl=60, wait=0)

    def broken(batch: object, cut: int) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    store._write = broken  # type: ignore[method-assign]
    with pytest.raises(lockd.BackendUnavailable, match="disk I/O error"):
        await store.acquire(NS, "b", "me", ttl=60, wait=0)
    with pytest.raises(lockd.BackendUnavailable, match="out of service"):
        await store.acquire(NS, "c", "me", ttl=60, wait=0)
    with pytest.raises(lockd.BackendUnavailable, match="disk I/O error"):
        await store.ping()
    await store.aclose()

    store = await opened(tmp_path)
    try:
        assert [r.name for r in await store.list_locks(NS)] == ["a"]
    finally:
        await store.aclose()


async def test_a_grant_whose_caller_left_is_given_back_on_disk(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    for name in ("a", "b"):
        task = asyncio.create_task(store.acquire(NS, name, "me", ttl=60, wait=0))
        await asyncio.sleep(0)  # the step ran; its write is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await store.acquire(NS, "c", "me", ttl=60, wait=0)
    await store.aclose()

    store = await opened(tmp_path)
    try:
        assert [r.name for r in await store.list_locks(NS)] == ["c"]
    finally:
        await store.aclose()


# --- the writer paused and failed at chosen moments (tests/faults/filewriter.py) -------------


async def test_a_waiter_granted_while_its_wait_ends_keeps_the_grant(tmp_path: Path) -> None:
    """Issue 12 item 2: the waiter's wait ends while the step that granted it is being
    written, and a retry of its request id comes meanwhile. Both must get the one grant,
    and the store must still have it once the write is done."""
    gate = Gate()
    store = await opened(tmp_path, gate=gate)
    try:
        first = await store.acquire(NS, "a", "holder", ttl=60, wait=0)
        waiting = asyncio.create_task(store.acquire(NS, "a", "w", ttl=60, wait=0.1, request_id="r"))
        await bqueued(store, "a", 1)
        gate.pause()
        releasing = asyncio.create_task(store.release(NS, "a", "holder", first.token))
        await gate.paused()  # the release granted w; that grant is not on disk yet
        await asyncio.sleep(0.2)  # w's wait (0.1 s) has ended: its timer ran before this one
        retry = asyncio.create_task(store.acquire(NS, "a", "w", ttl=60, wait=0, request_id="r"))
        await asyncio.sleep(0.01)
        gate.resume()
        assert await releasing == 0
        outcomes = await asyncio.gather(waiting, retry, return_exceptions=True)
        grants = [o for o in outcomes if isinstance(o, lockd.Grant)]
        assert grants, outcomes
        info = await store.inspect(NS, "a")
        assert [(h.owner, h.token, h.count) for h in info.holders] == [("w", 2, 1)]
        assert all((g.owner, g.token, g.count) == ("w", 2, 1) for g in grants), outcomes
        assert isinstance(outcomes[0], lockd.Grant), "the grant came first: it wins the wait"
        with pytest.raises(lockd.AcquireTimeout):
            await store.acquire(NS, "a", "third", ttl=60, wait=0)
    finally:
        gate.resume()
        await store.aclose()


async def test_no_answer_leaves_before_what_it_read_is_durable(tmp_path: Path) -> None:
    """Issue 12 item 10: with the writer slow and then failing (disk full), a retry of a
    request id, an inspect and a NotHeld answer all read the grant being written: none
    may answer from it. After a restart the token is free again, and nobody was told
    they had it."""
    gate = Gate()
    store = await opened(tmp_path, gate=gate)
    try:
        gate.pause()
        original = asyncio.create_task(
            store.acquire(NS, "a", "me", ttl=60, wait=0, request_id="r1")
        )
        await gate.paused()
        readers = [
            asyncio.create_task(store.acquire(NS, "a", "me", ttl=60, wait=0, request_id="r1")),
            asyncio.create_task(store.inspect(NS, "a")),
            asyncio.create_task(store.release(NS, "a", "other", None)),
            asyncio.create_task(store.list_locks(NS)),
        ]
        for _ in range(10):
            await asyncio.sleep(0)
        assert not any(r.done() for r in readers), [r.result() for r in readers if r.done()]
        gate.fail()
        gate.resume()
        with pytest.raises(lockd.BackendUnavailable, match="disk is full"):
            await original
        for outcome in await asyncio.gather(*readers, return_exceptions=True):
            assert isinstance(outcome, lockd.BackendUnavailable), outcome
        with pytest.raises(lockd.BackendUnavailable, match="out of service"):
            await store.inspect(NS, "a")
    finally:
        gate.resume()
        await store.aclose()

    store = await opened(tmp_path)
    try:
        assert (await store.inspect(NS, "a")).holders == ()
        again = await store.acquire(NS, "a", "someone", ttl=60, wait=0)
        assert again.token == 1  # free to give: nobody was ever answered token 1
    finally:
        await store.aclose()


async def test_a_failed_write_fails_the_waiter_it_granted(tmp_path: Path) -> None:
    """A waiter granted by a step whose write fails hears BackendUnavailable at once
    (not a timeout at the end of its wait), and what was answered before is kept."""
    gate = Gate()
    store = await opened(tmp_path, gate=gate)
    try:
        first = await store.acquire(NS, "a", "holder", ttl=60, wait=0)
        kept = await store.acquire(NS, "b", "holder", ttl=60, wait=0)
        waiting = asyncio.create_task(store.acquire(NS, "a", "w", ttl=60, wait=30))
        await bqueued(store, "a", 1)
        gate.pause()
        releasing = asyncio.create_task(store.release(NS, "a", "holder", first.token))
        await gate.paused()
        gate.fail()
        gate.resume()
        with pytest.raises(lockd.BackendUnavailable):
            await releasing
        with pytest.raises(lockd.BackendUnavailable):
            await asyncio.wait_for(waiting, 2.0)
    finally:
        gate.resume()
        await store.aclose()

    store = await opened(tmp_path)
    try:  # the release was never answered: both acknowledged holds are there
        assert [(r.name, r.holders[0].token) for r in await store.list_locks(NS)] == [
            ("a", first.token),
            ("b", kept.token),
        ]
    finally:
        await store.aclose()


async def test_opening_a_slow_store_does_not_stall_the_loop(tmp_path: Path) -> None:
    """Issue 12 item 13: the SQLite open and restore run off the event loop."""
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    started = loop.time()
    store = await opened(tmp_path, gate=Gate(slow_open=0.5))
    took = loop.time() - started
    await asyncio.sleep(0.02)  # a tick after the open, to measure the gap it left
    ticker.cancel()
    try:
        assert took >= 0.5  # the slow open did run
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < 0.25, f"the loop stalled for {max(gaps):.3f} s while opening"
        assert (await store.acquire(NS, "a", "me", ttl=60, wait=0)).token == 1
    finally:
        await store.aclose()


async def test_a_store_not_opened_refuses_calls(tmp_path: Path) -> None:
    store = FileBackend(tmp_path)
    try:
        with pytest.raises(lockd.BackendUnavailable, match="not open"):
            await store.acquire(NS, "a", "me", ttl=60, wait=0)
    finally:
        await store.aclose()
    store = await opened(tmp_path)  # the process lock was let go
    await store.aclose()


def test_sync_normal_states_what_it_survives(tmp_path: Path) -> None:
    """Issue 12 item 12: ``sync=normal`` survives kill -9 but not a power loss, which can
    lose the last commits and hand a token out again."""
    full = lockd.connect(f"file://{tmp_path / 'full'}")
    normal = lockd.connect(f"file://{tmp_path / 'normal'}?sync=normal")
    try:
        assert full.capabilities.safety is lockd.SafetyLevel.LINEARIZABLE
        assert (full.capabilities.durable, full.capabilities.fencing) == (True, True)
        assert normal.capabilities.safety is lockd.SafetyLevel.SINGLE_NODE
        assert (normal.capabilities.durable, normal.capabilities.fencing) == (False, False)
        assert normal.capabilities.fair
        with pytest.raises(lockd.SafetyUnavailable):
            require_safety(normal, "linearizable")
    finally:
        asyncio.run(full.aclose())
        asyncio.run(normal.aclose())


async def test_a_restart_keeps_when_each_hold_was_acquired(tmp_path: Path) -> None:
    """Issue 12 item 15: ``acquired_at`` is the original grant's time after a restart, and
    ``held_for`` goes on from it (wall clock, display only); the lease itself restarts."""
    wall = [1_700_000_000.0]
    store = await opened(tmp_path, wall=lambda: wall[0])
    try:
        await store.acquire(NS, "a", "me", ttl=60, wait=0)
    finally:
        await store.aclose()
    wall[0] += 100.0
    store = await opened(tmp_path, wall=lambda: wall[0])
    try:
        (holder,) = (await store.inspect(NS, "a")).holders
        assert holder.acquired_at == 1_700_000_000.0
        assert 100.0 <= holder.held_for < 101.0
        assert 59.0 < holder.ttl_left <= 60.0
    finally:
        await store.aclose()


async def test_a_store_of_the_layout_before_name_records_is_carried_over(tmp_path: Path) -> None:
    """Names without revocation columns, a store-wide revoked table, no counter row: the
    counter goes on from the highest token on disk."""
    db = sqlite3.connect(tmp_path / "lockd.db")
    with db:
        db.executescript(
            "CREATE TABLE holds (namespace TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT"
            " NULL, token INTEGER NOT NULL, count INTEGER NOT NULL, ttl REAL NOT NULL, lim"
            " INTEGER NOT NULL, acquired_at REAL NOT NULL, PRIMARY KEY (namespace, name, owner));"
            " CREATE TABLE names (namespace TEXT NOT NULL, name TEXT NOT NULL, last_token"
            " INTEGER NOT NULL, PRIMARY KEY (namespace, name));"
            " CREATE TABLE revoked (token INTEGER PRIMARY KEY);"
        )
        db.execute("INSERT INTO names VALUES (?, 'a', 5)", (NS,))
        db.execute("INSERT INTO names VALUES (?, 'b', 7)", (NS,))
        db.execute("INSERT INTO holds VALUES (?, 'b', 'me', 7, 1, 60.0, 1, 0.0)", (NS,))
        db.execute("INSERT INTO revoked VALUES (5)")
    db.close()

    store = await opened(tmp_path)
    try:
        assert (await store.acquire(NS, "c", "me", ttl=60, wait=0)).token == 8
        assert [h.token for h in (await store.inspect(NS, "b")).holders] == [7]
        with pytest.raises(lockd.LockLost):  # its revocation named no lock: it went
            await store.release(NS, "a", "me", 5)
    finally:
        await store.aclose()
    store = await opened(tmp_path)
    try:
        assert (await store.acquire(NS, "d", "me", ttl=60, wait=0)).token == 9
    finally:
        await store.aclose()


async def test_sessions_and_their_holds_survive_a_restart_with_their_full_ttl(
    tmp_path: Path,
) -> None:
    store = await opened(tmp_path)
    sid = await store.open_session(30)
    ended = await store.open_session(30)
    await store.revoke_session(ended)
    grant = await store.acquire(NS, "a", "me", ttl=30, wait=0, session=sid)
    await store.aclose()

    store = await opened(tmp_path)
    try:
        assert ttls(await store.keepalive([sid, ended])) == [30, None]
        holders = (await store.inspect(NS, "a")).holders
        assert [(h.owner, h.token) for h in holders] == [("me", grant.token)]
        await store.revoke_session(sid)  # the hold rejoined its session: it ends with it
        assert (await store.inspect(NS, "a")).holders == ()
    finally:
        await store.aclose()

    store = await opened(tmp_path)
    try:  # the end was written too
        assert (await store.inspect(NS, "a")).holders == ()
        assert ttls(await store.keepalive([sid])) == [None]
    finally:
        await store.aclose()


async def test_a_store_from_before_sessions_is_carried_over(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    grant = await store.acquire(NS, "a", "me", ttl=60, wait=0)
    await store.aclose()
    db = sqlite3.connect(tmp_path / "lockd.db")
    with db:  # the layout before sessions
        db.execute("ALTER TABLE holds DROP COLUMN sessions")
        db.execute("DROP TABLE sessions")
    db.close()

    store = await opened(tmp_path)
    try:
        holders = (await store.inspect(NS, "a")).holders
        assert [(h.owner, h.token, h.ttl_left > 59) for h in holders] == [("me", grant.token, True)]
        sid = await store.open_session(30)
        await store.acquire(NS, "b", "me", ttl=30, wait=0, session=sid)
    finally:
        await store.aclose()
