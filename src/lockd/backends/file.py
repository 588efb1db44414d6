"""The embedded durable store (``file://PATH``): the lock table of the memory store, with
every change written to SQLite (WAL mode) before the caller is answered.

Why SQLite: it is in the standard library, its WAL journal survives kill -9 and (with
``synchronous=FULL``, the default) power loss, and a transaction per batch of steps
makes "persist before replying" simple. A token is therefore on disk before anyone sees
it, so none is ever handed out twice, whatever moment the process dies at.

Group commit: steps hand their changes to ``_persist``, which queues them; one writer
thread writes everything queued in one transaction (one fsync) while the event loop
goes on serving, and then every step of that batch is answered. Under load the batches
grow, so the fsync cost is shared.

One process at a time: the store takes an exclusive ``flock`` on ``PATH/lockd.lock``
and writes its pid there. A second process that opens the same path is refused with
:class:`~lockd.errors.StoreBusy` naming that pid. Clients inside one process share
one open store (see ``lockd._runtime``); other processes reach it through
``lockd serve``.

After a restart every hold gets its full ttl again, counted from the restart: a restart
never shortens a hold, and a hold whose owner is gone still ends within its ttl.
Waiters are not persisted: they are live calls of the process that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lockd._core import Changes, Hold, Key, RequestKey
from lockd.backends.memory import Clock, LocalBackend
from lockd.errors import BackendUnavailable, InvalidRequest, StoreBusy
from lockd.model import Capabilities, SafetyLevel

__all__ = ["FileBackend"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS holds (
    namespace TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
    token INTEGER NOT NULL, count INTEGER NOT NULL, ttl REAL NOT NULL,
    lim INTEGER NOT NULL, acquired_at REAL NOT NULL,
    PRIMARY KEY (namespace, name, owner)
);
CREATE TABLE IF NOT EXISTS names (
    namespace TEXT NOT NULL, name TEXT NOT NULL, last_token INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS revoked (token INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS request_log (
    op TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
    request_id TEXT NOT NULL, value INTEGER NOT NULL
);
"""
# The answers to request ids are an append-only log (one B-tree to touch per commit, no
# key index); the restore reads it in order, so a later row for a request id wins.
KEPT_REQUESTS = 100_000
SYNC_MODES = ("full", "normal")
OnDurable = Callable[[BackendUnavailable | None], None]


class FileBackend(LocalBackend):
    """Locks in a directory on disk; survives restarts and kill -9 of its process."""

    capabilities = Capabilities(
        safety=SafetyLevel.LINEARIZABLE,
        fencing=True,
        fair=True,
        durable=True,
        shared_across_processes=False,
    )

    _persistent = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: str = "full",
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        if sync not in SYNC_MODES:
            raise InvalidRequest(f"file store sync must be one of {SYNC_MODES}, not {sync!r}")
        self.path = Path(path).resolve()
        super().__init__(f"file://{self.path}", clock=clock, wall=wall)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot create file store at {self.path}: {exc}") from exc
        self._lock_fd = _take_process_lock(self.path / "lockd.lock")
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._serve_jobs, name="lockd-file", daemon=True)
        self._batch: list[tuple[Changes, OnDurable]] = []
        self._writing = False
        self._drained = asyncio.Event()
        self._drained.set()
        try:
            self._db = sqlite3.connect(
                self.path / "lockd.db", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={sync.upper()}")
            self._db.executescript(SCHEMA)
            self._restore()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._writer.start()

    def _restore(self) -> None:
        db = self._db
        names: dict[Key, int] = {
            (ns, name): int(token)
            for ns, name, token in db.execute("SELECT namespace, name, last_token FROM names")
        }
        # The counter is the highest token any name got (the names table keeps each).
        last_token = max(names.values(), default=0)
        holds: list[tuple[Key, Hold]] = [
            ((ns, name), Hold(owner, token, count, ttl, lim, 0.0, 0.0, acquired_at))
            for ns, name, owner, token, count, ttl, lim, acquired_at in db.execute(
                "SELECT namespace, name, owner, token, count, ttl, lim, acquired_at FROM holds"
            )
        ]
        revoked = [int(t) for (t,) in db.execute("SELECT token FROM revoked ORDER BY token")]
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchone():
            # A store written before the log: its keyed table becomes the log's start.
            db.executescript(
                "BEGIN; INSERT INTO request_log SELECT op, namespace, name, owner, request_id,"
                " value FROM requests ORDER BY rowid; DROP TABLE requests; COMMIT;"
            )
        db.execute(
            "DELETE FROM request_log WHERE rowid <= (SELECT max(rowid) FROM request_log) - ?",
            (KEPT_REQUESTS,),
        )
        requests: dict[RequestKey, int] = {}
        for op, ns, name, owner, rid, value in db.execute(
            "SELECT op, namespace, name, owner, request_id, value FROM request_log ORDER BY rowid"
        ):
            key = (op, ns, name, owner, rid)
            requests.pop(key, None)  # the later answer is also the more recent one
            requests[key] = int(value)
        self._table.restore(
            holds, last_token, revoked, list(requests.items()), self._clock(), names
        )

    def _persist(self, changes: Changes, on_durable: OnDurable) -> None:
        """Queue ``changes`` for the next transaction; ``on_durable`` runs at its commit."""
        self._batch.append((changes, on_durable))
        if not self._writing:
            self._write_next()

    def _write_next(self) -> None:
        batch, self._batch = self._batch, []
        if self._failure is not None:  # nothing more is written: it builds on what was lost
            self._written(batch, self._failure)
            return
        self._writing = True
        self._drained.clear()
        self._submit(lambda: self._write([changes for changes, _ in batch]),
                     lambda failure: self._written(batch, failure))  # fmt: skip

    def _written(
        self, batch: list[tuple[Changes, OnDurable]], failure: BackendUnavailable | None
    ) -> None:
        if failure is not None and self._failure is None:
            self._out_of_service(failure)
        for _, on_durable in batch:
            on_durable(failure)  # steps these run (give-backs) join the next batch
        self._writing = False
        if self._batch:
            self._write_next()
        else:
            self._drained.set()

    def _submit(self, work: Callable[[], object], then: OnDurable) -> None:
        """Run ``work`` in the writer thread, then ``then`` with its failure in the loop."""
        loop = asyncio.get_running_loop()

        def job() -> None:
            failure = None
            try:
                work()
            except Exception as exc:  # any error: the thread must live on to report it
                failure = BackendUnavailable(f"file store {self.path} failed: {exc}")
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to tell
                loop.call_soon_threadsafe(then, failure)

        self._jobs.put(job)

    def _serve_jobs(self) -> None:
        """The writer thread: run jobs in order until told to stop."""
        while (job := self._jobs.get()) is not None:
            job()

    def _write(self, batch: list[Changes]) -> None:
        """One transaction for every step of the batch (runs in the writer thread).

        Later steps supersede earlier ones, so the batch is merged first and written
        with one statement per table.
        """
        holds: dict[tuple[str, str, str], Hold | None] = {}
        names: dict[Key, int] = {}
        for changes in batch:
            holds.update(changes.holds)
            names.update(changes.names)
        gone = [key for key, hold in holds.items() if hold is None]
        kept = [(*key, h.token, h.count, h.ttl, h.limit, h.acquired_at)
                for key, h in holds.items() if h is not None]  # fmt: skip
        revoked = [(t,) for changes in batch for t in changes.revoked]
        requests = [(*key, value) for changes in batch for key, value in changes.requests]
        writes: list[tuple[str, list[tuple[Any, ...]]]] = [
            ("DELETE FROM holds WHERE namespace = ? AND name = ? AND owner = ?", gone),
            ("INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?, ?, ?, ?, ?)", kept),
            ("INSERT OR REPLACE INTO names VALUES (?, ?, ?)",
             [(*key, token) for key, token in names.items()]),
            ("INSERT OR IGNORE INTO revoked VALUES (?)", revoked),
            ("INSERT INTO request_log VALUES (?, ?, ?, ?, ?, ?)", requests),
        ]  # fmt: skip
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for sql, rows in writes:
                if rows:  # each call costs even with no rows
                    db.executemany(sql, rows)
            db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    async def ping(self) -> None:
        """Check the database answers."""
        self._check()
        answered: asyncio.Future[BackendUnavailable | None] = self._loop().create_future()

        def answer(failure: BackendUnavailable | None) -> None:
            if not answered.done():  # the caller may have left
                answered.set_result(failure)

        self._submit(lambda: self._db.execute("SELECT 1"), answer)
        failure = await answered
        if failure is not None:
            raise failure

    async def aclose(self) -> None:
        """Close the database and let another process open the store."""
        if self._lock_fd < 0:
            return
        if self._failure is None and not self._closed:
            # Holds that ended must not come back at the next start with a fresh ttl.
            with contextlib.suppress(BackendUnavailable):
                await self._durably(None, lambda: (None, self._table.expire(self._clock())))
        await super().aclose()
        await self._drained.wait()
        self._jobs.put(None)
        self._writer.join()  # at once: every write has been answered
        self._db.close()
        os.close(self._lock_fd)
        self._lock_fd = -1


def _take_process_lock(lock_path: Path) -> int:
    """Hold ``lock_path`` exclusively for this process, or raise StoreBusy naming the holder."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        here = " (this process)" if holder == str(os.getpid()) else ""
        raise StoreBusy(
            f"file store {lock_path.parent} is open in process {holder}{here}; "
            "share it through `lockd serve` or one client per process"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
