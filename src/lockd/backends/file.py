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

Opening (SQLite's open, schema and the restore's reads) runs in the writer thread, so
a slow disk does not stall the event loop that serves every other client.

Commit index: every answer waits until what it read is on disk (see ``memory``), and a
failed write (a full disk, an I/O error) puts the store out of service at once: every
later call, every waiter and every answer still waiting for that write gets
``BackendUnavailable``, and nothing queued after it is written. So nothing that was
answered is lost; the next open starts from what was committed.

After a restart every hold gets its full ttl again, counted from the restart: a restart
never shortens a hold, and a hold whose owner is gone still ends within its ttl. Its
``acquired_at`` is kept, and ``held_for`` goes on from it (both by the wall clock, for
display only). Waiters are not persisted: they are live calls of the process that died.

Growth: the token counter is a row of its own (``counter``), so an idle name's row in
``names`` can be pruned with its record (after ``retention``) without a token ever
repeating; the request-id log is cut to what is younger than ``retention`` and to the
newest ``KEPT_REQUESTS`` rows.

``?sync=normal`` commits without waiting for the disk: that survives kill -9 of the
process but not a power loss or OS crash, which can lose the last commits and so hand
out a token again. Its capabilities say so: ``single-node``, not fencing, not durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lockd._core import RETENTION, Changes, Hold, Key, Lease, NameRecord, RequestKey, Session
from lockd.backends.memory import Clock, LocalBackend
from lockd.errors import BackendUnavailable, InvalidRequest, StoreBusy
from lockd.model import Capabilities, SafetyLevel

__all__ = ["FileBackend", "WriterGate"]

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS holds (
    namespace TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
    token INTEGER NOT NULL, count INTEGER NOT NULL, ttl REAL NOT NULL,
    lim INTEGER NOT NULL, acquired_at REAL NOT NULL, sessions TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (namespace, name, owner)
);
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, ttl REAL NOT NULL);
CREATE TABLE IF NOT EXISTS names (
    namespace TEXT NOT NULL, name TEXT NOT NULL, last_token INTEGER NOT NULL,
    revoked TEXT NOT NULL DEFAULT '[]', evicted TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS counter (last_token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS request_log (
    op TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
    request_id TEXT NOT NULL, value INTEGER NOT NULL
);
"""
# The answers to request ids are an append-only log (one B-tree to touch per commit, no
# key index); the restore reads it in order, so a later row for a request id wins. Its
# rowids rise by one per row (its last row is never cut), so the loop knows each row's.
KEPT_REQUESTS = 100_000
NO_OWN_LEASE = 0.0
"""The ``ttl`` of a hold kept by its sessions alone (a real ttl is at least MIN_TTL)."""
SYNC_MODES = ("full", "normal")
OnDurable = Callable[[BackendUnavailable | None], None]

DURABLE = Capabilities(
    safety=SafetyLevel.LINEARIZABLE,
    fencing=True,
    fair=True,
    durable=True,
    shared_across_processes=False,
    sessions=True,
)
"""``sync=full``: every answer is on disk (fsync) before it leaves."""
KILL_SAFE = Capabilities(
    safety=SafetyLevel.SINGLE_NODE,
    fencing=False,
    fair=True,
    durable=False,
    shared_across_processes=False,
    sessions=True,
)
"""``sync=normal``: survives kill -9, not a power loss (which can repeat a token)."""


class WriterGate(Protocol):
    """Hooks the writer thread calls, for fault tests: each may block (a slow disk) or
    raise (a failing one). Without a gate the writer calls nothing."""

    def before_open(self) -> None:
        """Before the database is opened and read."""

    def before_commit(self) -> None:
        """Inside each write transaction, just before its COMMIT."""


@dataclass(slots=True)
class _Loaded:
    """What the restore read from disk (in the writer thread)."""

    db: sqlite3.Connection
    holds: list[tuple[Key, Hold]]
    last_token: int
    requests: list[tuple[RequestKey, int]]
    names: dict[Key, NameRecord]
    log_end: int
    sessions: dict[str, float]


class FileBackend(LocalBackend):
    """Locks in a directory on disk; survives restarts and kill -9 of its process."""

    capabilities = DURABLE

    _persistent = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: str = "full",
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        retention: float = RETENTION,
        gate: WriterGate | None = None,
    ) -> None:
        if sync not in SYNC_MODES:
            raise InvalidRequest(f"file store sync must be one of {SYNC_MODES}, not {sync!r}")
        self.path = Path(path).resolve()
        super().__init__(f"file://{self.path}", clock=clock, wall=wall, retention=retention)
        if sync != "full":
            self.capabilities = KILL_SAFE
        self._sync = sync
        self._gate = gate
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot create file store at {self.path}: {exc}") from exc
        self._lock_fd = _take_process_lock(self.path / "lockd.lock")
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._serve_jobs, name="lockd-file", daemon=True)
        self._db: sqlite3.Connection | None = None
        self._batch: list[tuple[Changes | None, OnDurable]] = []
        self._readers: list[OnDurable] = []
        """Answers waiting only for the batch being written."""
        self._writing = False
        self._answering = False
        """The batch being written is durable; its steps are being answered."""
        self._drained = asyncio.Event()
        self._drained.set()
        self._log_end = 0
        """The rowid of the request log's last row, once everything queued is written."""
        self._log_marks: deque[tuple[float, int]] = deque()
        """(clock reading, log end) of each batch that added rows, oldest first."""
        self._log_cut = 0
        """Rows up to this rowid are cut (or queued to be)."""

    async def open(self) -> None:
        """Open the database and restore the state, in the writer thread."""
        if self._db is not None or self._lock_fd < 0:
            return
        if not self._writer.is_alive():
            self._writer.start()
        try:
            loaded = await self._in_writer(self._load)
        except (sqlite3.Error, OSError) as exc:
            await self.aclose()
            raise BackendUnavailable(f"cannot open file store {self.path}: {exc}") from exc
        except BaseException:
            await self.aclose()
            raise
        self._db = loaded.db
        now = self._clock()
        self._table.restore(loaded.holds, loaded.last_token, loaded.requests, now,
                            loaded.names, self._wall(), loaded.sessions)  # fmt: skip
        self._log_end = loaded.log_end
        self._log_marks.append((now, loaded.log_end))

    def _load(self) -> _Loaded:
        """Open, create or carry over the schema, and read everything (writer thread)."""
        if self._gate is not None:
            self._gate.before_open()
        db = sqlite3.connect(self.path / "lockd.db", isolation_level=None, check_same_thread=False)
        try:
            return self._read(db)
        except BaseException:
            db.close()
            raise

    def _read(self, db: sqlite3.Connection) -> _Loaded:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._sync.upper()}")
        db.executescript(SCHEMA)
        _carry_over(db)
        names: dict[Key, NameRecord] = {
            (ns, name): NameRecord(
                int(token),
                dict.fromkeys(int(t) for t in json.loads(revoked)),
                dict.fromkeys(str(o) for o in json.loads(evicted)),
            )
            for ns, name, token, revoked, evicted in db.execute(
                "SELECT namespace, name, last_token, revoked, evicted FROM names"
            )
        }
        holds: list[tuple[Key, Hold]] = [
            ((ns, name), _hold((ns, name), owner, token, count, ttl, lim, acquired_at, ids))
            for ns, name, owner, token, count, ttl, lim, acquired_at, ids in db.execute(
                "SELECT namespace, name, owner, token, count, ttl, lim, acquired_at, sessions"
                " FROM holds"
            )
        ]
        sessions = {str(i): float(ttl) for i, ttl in db.execute("SELECT id, ttl FROM sessions")}
        (last_token,) = db.execute("SELECT last_token FROM counter").fetchone()
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
        (log_end,) = db.execute("SELECT coalesce(max(rowid), 0) FROM request_log").fetchone()
        return _Loaded(db, holds, int(last_token), list(requests.items()), names, int(log_end),
                       sessions)  # fmt: skip

    def _check(self) -> None:
        super()._check()
        if self._db is None:
            raise BackendUnavailable(f"{self.url} is not open (await open() first)")

    def _unwritten(self) -> bool:
        return bool(self._batch) or (self._writing and not self._answering)

    def _persist(self, changes: Changes | None, on_durable: OnDurable) -> None:
        """Queue ``changes`` for the next transaction; ``on_durable`` runs at its commit.

        ``None`` (a step that changed nothing) waits only for what is already queued.
        """
        if changes is None and not self._batch:
            self._readers.append(on_durable)  # what it read is in the batch being written
            return
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
        merged = [changes for changes, _ in batch if changes is not None]
        cut = self._next_cut(sum(len(changes.requests) for changes in merged))
        self._submit(lambda: self._write(merged, cut),
                     lambda failure: self._written(batch, failure))  # fmt: skip

    def _next_cut(self, rows: int) -> int:
        """Count ``rows`` new log rows; return the rowid up to which the log may be cut
        (rows older than the retention or beyond the newest KEPT_REQUESTS), or 0."""
        now = self._clock()
        if rows:
            self._log_end += rows
            self._log_marks.append((now, self._log_end))
        cut = self._log_end - KEPT_REQUESTS
        while self._log_marks and self._log_marks[0][0] <= now - self._table.retention:
            cut = max(cut, self._log_marks.popleft()[1])
        cut = min(cut, self._log_end - 1)  # keep the last row: rowids go on from it
        if cut <= self._log_cut:
            return 0
        self._log_cut = cut
        return cut

    def _written(
        self, batch: list[tuple[Changes | None, OnDurable]], failure: BackendUnavailable | None
    ) -> None:
        if failure is not None and self._failure is None:
            self._out_of_service(failure)
        readers, self._readers = self._readers, []
        self._answering = True
        for _, on_durable in batch:
            on_durable(failure)  # steps these run (give-backs) join the next batch
        for on_durable in readers:
            on_durable(failure)
        self._answering = self._writing = False
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

    async def _in_writer(self, work: Callable[[], T]) -> T:
        """Run ``work`` in the writer thread and return its result."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def job() -> None:
            try:
                result = work()
            except BaseException as exc:  # handed to the caller in the loop
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        self._jobs.put(job)
        return await done

    def _serve_jobs(self) -> None:
        """The writer thread: run jobs in order until told to stop."""
        while (job := self._jobs.get()) is not None:
            job()

    def _write(self, batch: list[Changes], cut: int) -> None:
        """One transaction for every step of the batch (runs in the writer thread).

        Later steps supersede earlier ones, so the batch is merged first and written
        with one statement per table.
        """
        holds: dict[tuple[str, str, str], Hold | None] = {}
        sessions: dict[str, float | None] = {}
        names: dict[Key, NameRecord | None] = {}
        counter: int | None = None
        for changes in batch:
            holds.update(changes.holds)
            sessions.update(changes.sessions)
            names.update(changes.names)
            if changes.last_token is not None:
                counter = changes.last_token
        gone = [key for key, hold in holds.items() if hold is None]
        kept = [(*key, h.token, h.count, NO_OWN_LEASE if h.own is None else h.own.ttl, h.limit,
                 h.acquired_at, _json([session.id for session in h.sessions]))
                for key, h in holds.items() if h is not None]  # fmt: skip
        named = [(*key, r.last_token, _json(list(r.revoked)), _json(list(r.evicted)))
                 for key, r in names.items() if r is not None]  # fmt: skip
        pruned = [key for key, record in names.items() if record is None]
        requests = [(*key, value) for changes in batch for key, value in changes.requests]
        writes: list[tuple[str, list[tuple[Any, ...]]]] = [
            ("DELETE FROM holds WHERE namespace = ? AND name = ? AND owner = ?", gone),
            ("INSERT OR REPLACE INTO holds (namespace, name, owner, token, count, ttl, lim,"
             " acquired_at, sessions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", kept),
            ("INSERT OR REPLACE INTO sessions VALUES (?, ?)",
             [(i, ttl) for i, ttl in sessions.items() if ttl is not None]),
            ("DELETE FROM sessions WHERE id = ?",
             [(i,) for i, ttl in sessions.items() if ttl is None]),
            ("INSERT OR REPLACE INTO names VALUES (?, ?, ?, ?, ?)", named),
            ("DELETE FROM names WHERE namespace = ? AND name = ?", pruned),
            ("UPDATE counter SET last_token = ?", [] if counter is None else [(counter,)]),
            ("INSERT INTO request_log VALUES (?, ?, ?, ?, ?, ?)", requests),
            ("DELETE FROM request_log WHERE rowid <= ?", [(cut,)] if cut else []),
        ]  # fmt: skip
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            for sql, rows in writes:
                if rows:  # each call costs even with no rows
                    db.executemany(sql, rows)
            if self._gate is not None:
                self._gate.before_commit()
            db.execute("COMMIT")
        except BaseException:
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

        db = self._db
        assert db is not None
        self._submit(lambda: db.execute("SELECT 1"), answer)
        failure = await answered
        if failure is not None:
            raise failure

    async def aclose(self) -> None:
        """Close the database and let another process open the store."""
        if self._lock_fd < 0:
            return
        if self._db is not None and self._failure is None and not self._closed:
            # Holds that ended must not come back at the next start with a fresh ttl.
            with contextlib.suppress(BackendUnavailable):
                await self._durably(None, lambda: (None, self._table.expire(self._clock())))
        await super().aclose()
        await self._drained.wait()
        if self._writer.is_alive():
            self._jobs.put(None)
            self._writer.join()  # at once: every write has been answered
        if self._db is not None:
            self._db.close()
        os.close(self._lock_fd)
        self._lock_fd = -1


def _json(items: list[Any]) -> str:
    return json.dumps(items) if items else "[]"


def _hold(
    key: Key,
    owner: str,
    token: int,
    count: int,
    ttl: float,
    lim: int,
    acquired_at: float,
    ids: str,
) -> Hold:
    """A hold as read back: its own lease's ttl and its sessions' ids (the restore gives
    them their expiry)."""
    own = None if ttl == NO_OWN_LEASE else Lease(ttl, 0.0)
    sessions = tuple(Session(0.0, 0.0, str(i)) for i in json.loads(ids))
    return Hold(key, owner, token, count, own, sessions, lim, 0.0, acquired_at)


def _carry_over(db: sqlite3.Connection) -> None:
    """Bring a store written by an earlier layout up to this one."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchone():
        # A store written before the log: its keyed table becomes the log's start.
        db.executescript(
            "BEGIN; INSERT INTO request_log SELECT op, namespace, name, owner, request_id,"
            " value FROM requests ORDER BY rowid; DROP TABLE requests; COMMIT;"
        )
    columns = {row[1] for row in db.execute("PRAGMA table_info(names)")}
    if "revoked" not in columns:
        # Before per-name records. Its store-wide revoked tokens name no lock, so they go:
        # a late call with one of them hears LockLost instead of Revoked.
        db.executescript(
            "BEGIN; ALTER TABLE names ADD COLUMN revoked TEXT NOT NULL DEFAULT '[]';"
            " ALTER TABLE names ADD COLUMN evicted TEXT NOT NULL DEFAULT '[]';"
            " DROP TABLE IF EXISTS revoked; COMMIT;"
        )
    if "sessions" not in {row[1] for row in db.execute("PRAGMA table_info(holds)")}:
        # Before sessions: every hold had its own lease.
        db.execute("ALTER TABLE holds ADD COLUMN sessions TEXT NOT NULL DEFAULT '[]'")
    if db.execute("SELECT 1 FROM counter").fetchone() is None:
        # Before the counter row: the counter was the highest token any name got.
        db.execute(
            "INSERT INTO counter SELECT max(coalesce((SELECT max(last_token) FROM names), 0),"
            " coalesce((SELECT max(token) FROM holds), 0))"
        )


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
