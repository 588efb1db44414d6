"""The file store's own persistence: the request-id log, old stores, write failures."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import lockd
from lockd.backends.file import FileBackend

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
