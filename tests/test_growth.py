"""Issue 12 item 11: one-off lock names leave bounded state in the memory and file stores.

Each test takes a few thousand names once each (with request ids, as the SDK sends
them), lets the store's clock (a fake one, moved by hand) pass the retention, sweeps,
and counts what is left: in the lock table, and for the file store in its tables.
Tokens must still rise across the pruning and a restart.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

import lockd
from lockd._core import MAX_REMEMBERED_REQUESTS, RETENTION
from lockd.backends.file import KEPT_REQUESTS, FileBackend
from lockd.backends.memory import LocalBackend, MemoryBackend

NS = "default"
NAMES = int(os.environ.get("LOCKD_GROWTH_NAMES", "3000"))
"""``make safety`` runs these with 100,000 names."""
REQUESTS = min(2 * NAMES, MAX_REMEMBERED_REQUESTS)
"""Request ids remembered after the names' acquires and releases (the table's cap)."""


class FakeClock:
    """The store's monotonic clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def one_off_names(store: LocalBackend, count: int, prefix: str = "order-") -> int:
    """Take and release ``count`` names once each; returns the last token given."""
    grants = await asyncio.gather(
        *(
            store.acquire(NS, f"{prefix}{i}", "worker", ttl=30, wait=0, request_id=f"a{i}")
            for i in range(count)
        )
    )
    left = await asyncio.gather(
        *(
            store.release(NS, g.name, "worker", g.token, request_id=f"r{i}")
            for i, g in enumerate(grants)
        )
    )
    assert set(left) == {0}
    return max(g.token for g in grants)


def rows(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path / "lockd.db")
    try:
        tables = ("holds", "names", "request_log")
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
        counts["counter"] = db.execute("SELECT last_token FROM counter").fetchone()[0]
        return counts
    finally:
        db.close()


async def test_memory_store_forgets_idle_names_and_old_request_ids() -> None:
    clock = FakeClock()
    store = MemoryBackend("memory://growth", clock=clock)
    try:
        last = await one_off_names(store, NAMES)
        held = await store.acquire(NS, "kept", "keeper", ttl=RETENTION * 10, wait=0)
        assert store._table.sizes() == {
            "resources": 1,
            "names": NAMES + 1,
            "requests": REQUESTS,
            "sessions": 0,
        }
        # Within the retention a late release still hears that its hold ended.
        clock.now += RETENTION - 1
        await store.sweep()
        with pytest.raises(lockd.LockLost):
            await store.release(NS, "order-0", "worker", 1)
        clock.now += 1
        await store.sweep()
        assert store._table.sizes() == {"resources": 1, "names": 1, "requests": 0, "sessions": 0}
        # After pruning it is simply not held: still refused, nothing changes.
        with pytest.raises(lockd.NotHeld) as late:
            await store.release(NS, "order-0", "worker", 1)
        assert type(late.value) is lockd.NotHeld
        # The held name is never pruned, and tokens go on rising for a pruned name.
        assert [h.token for h in (await store.inspect(NS, "kept")).holders] == [held.token]
        again = await store.acquire(NS, "order-0", "worker", ttl=30, wait=0)
        assert again.token > held.token > last
    finally:
        await store.aclose()


async def test_file_store_prunes_rows_and_tokens_rise_across_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    store = FileBackend(tmp_path, clock=clock, sync="normal")
    await store.open()
    try:
        last = await one_off_names(store, NAMES)
    finally:
        await store.aclose()
    before = rows(tmp_path)
    assert (before["holds"], before["names"], before["counter"]) == (0, NAMES, last)
    assert before["request_log"] == min(2 * NAMES, KEPT_REQUESTS)

    # A restart keeps every record for a retention from the restart.
    store = FileBackend(tmp_path, clock=clock, sync="normal")
    await store.open()
    try:
        with pytest.raises(lockd.LockLost):
            await store.extend(NS, "order-7", "worker", 8, 30)
        clock.now += RETENTION
        await store.sweep()
        assert store._table.sizes() == {"resources": 0, "names": 0, "requests": 0, "sessions": 0}
        after = rows(tmp_path)
        assert (after["holds"], after["names"], after["counter"]) == (0, 0, last)
        assert after["request_log"] <= 1  # its last row stays: rowids go on from it
        grant = await store.acquire(NS, "order-0", "worker", ttl=30, wait=0, request_id="a0")
        assert grant.token == last + 1  # the request id was forgotten: a new request
    finally:
        await store.aclose()

    store = FileBackend(tmp_path, clock=clock, sync="normal")
    await store.open()
    try:
        assert (await store.inspect(NS, "order-0")).holders[0].token == last + 1
        other = await store.acquire(NS, "order-1", "worker", ttl=30, wait=0)
        assert other.token == last + 2
        await store.release(NS, "order-1", "worker", other.token)
        clock.now += 2 * RETENTION
        await store.sweep()
        assert store._table.sizes()["names"] == 1  # order-0 is held
    finally:
        await store.aclose()
    assert rows(tmp_path)["names"] == 1
    assert rows(tmp_path)["counter"] == last + 2


async def test_file_store_keeps_its_request_log_to_the_newest_rows(tmp_path: Path) -> None:
    """Within the retention the log is still cut to the newest KEPT_REQUESTS rows."""
    import lockd.backends.file as file_module

    kept = file_module.KEPT_REQUESTS
    file_module.KEPT_REQUESTS = 500
    try:
        store = FileBackend(tmp_path, clock=FakeClock(), sync="normal")
        await store.open()
        try:
            await one_off_names(store, 1000)
            await store.sweep()
            await store.acquire(NS, "last", "worker", ttl=30, wait=0, request_id="z")
        finally:
            await store.aclose()
    finally:
        file_module.KEPT_REQUESTS = kept
    assert rows(tmp_path)["request_log"] <= 501
