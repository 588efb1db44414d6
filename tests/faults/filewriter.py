"""A file store whose writer thread the test pauses, slows or fails at will.

:class:`Gate` is a :class:`lockd.backends.file.WriterGate`: the writer calls it inside
every write transaction just before COMMIT, and before opening the database. A test
pauses the writer (every commit waits in the gate), lets its event loop run the steps
it wants in the order it wants (each step's table change happens at once; only its
durability waits), then makes the paused commit fail or go through. So races between
a write and a timeout, a retry or a read are replayed exactly, not hoped for.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

DISK_FULL = "database or disk is full"
LIMIT = 10.0
"""Seconds a paused commit waits at most: a test that forgets to resume fails, not hangs."""


class Gate:
    """Pause, fail or slow the writer of a ``FileBackend(..., gate=Gate())``."""

    def __init__(self, slow_open: float = 0.0) -> None:
        self._go = threading.Event()
        self._go.set()
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._slow_open = slow_open
        self.waiting = 0
        """Commits waiting in the gate now."""
        self.commits = 0
        """Commits that passed the gate (failed ones included)."""

    # --- the test's side ---------------------------------------------------------------

    def pause(self) -> None:
        """Hold every commit from now on until :meth:`resume`."""
        self._go.clear()

    def resume(self) -> None:
        """Let held and later commits go on."""
        self._go.set()

    def fail(self, message: str = DISK_FULL) -> None:
        """Make every commit from now on fail, as SQLite fails on a full disk."""
        self._failure = sqlite3.OperationalError(message)

    async def paused(self, commits: int = 1, within: float = 5.0) -> None:
        """Wait (in the test's loop) until ``commits`` commits are held in the gate."""
        deadline = time.monotonic() + within
        while self.waiting < commits:
            if time.monotonic() > deadline:
                raise AssertionError(f"no commit reached the gate within {within} s")
            await asyncio.sleep(0.001)

    # --- the writer's side (WriterGate) --------------------------------------------------

    def before_open(self) -> None:
        """A slow disk: opening takes ``slow_open`` seconds."""
        if self._slow_open:
            time.sleep(self._slow_open)

    def before_commit(self) -> None:
        """Wait while paused, then fail if told to."""
        with self._lock:
            self.waiting += 1
        try:
            if not self._go.wait(LIMIT):
                raise AssertionError(f"the test did not resume the writer within {LIMIT} s")
        finally:
            with self._lock:
                self.waiting -= 1
                self.commits += 1
        if self._failure is not None:
            raise self._failure
