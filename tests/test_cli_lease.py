"""``lockd run`` never lets its child outlive the lease: a store cut off mid-run.

The test finds the store's lease end from a renewal it sees (the hold's ``ttl_left``
jumps), cuts the store at once, and checks that the child is dead before that lease
could have ended and that the next ``lockd run`` of the name starts its child after.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lockd
from lockd.cli import EXIT_LOCK_LOST
from tests.serverproc import running_server

TTL, GRACE = 1.5, 0.6

CHILD = """
import os, signal, sys, time
log, tag, once = sys.argv[1], sys.argv[2], sys.argv[3] == "once"
def stamp(what):
    with open(log, "a") as f:
        f.write(f"{tag} {what} {time.monotonic()} {os.getpid()}\\n")
signal.signal(signal.SIGTERM, lambda *_: stamp("term"))  # noted, then carries on working
stamp("start")
while not once:
    stamp("work")
    time.sleep(0.01)
"""


def start_run(
    url: str, log: Path, tag: str, *options: str, once: bool = False
) -> subprocess.Popen[bytes]:
    """``lockd run job`` of a child that stamps ``log`` (once, or until it dies)."""
    child = [sys.executable, "-c", CHILD, str(log), tag, "once" if once else "loop"]
    command = [sys.executable, "-m", "lockd.cli", "--server", url, "run", "job", *options]
    return subprocess.Popen([*command, "--", *child], stderr=subprocess.DEVNULL)


def stamps(log: Path, tag: str) -> list[tuple[str, float, int]]:
    """(event, monotonic time, pid) of each stamp ``tag`` wrote."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [(w[1], float(w[2]), int(w[3])) for w in map(str.split, lines) if w[0] == tag]


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def dead(pid: int) -> bool:
    """True once ``pid`` has exited (gone, or a zombie not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or while, it was read
        return True


def lease_end_after_a_renewal(url: str) -> float:
    """Wait until the store renews the hold of "job"; return a lower bound (this process's
    monotonic clock) of when the renewed lease ends at the store."""
    with lockd.Client(url) as client:
        previous = None
        while True:
            sent = time.monotonic()
            (holder,) = client.inspect("job").holders
            if previous is not None and holder.ttl_left > previous + 0.1:
                return sent + holder.ttl_left
            previous = holder.ttl_left
            time.sleep(0.01)


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


def test_paused_store_child_dies_before_the_lease_and_the_next_run_starts_after(
    store: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    with running_server(store) as server:
        first = start_run(server.url, log, "A", "--ttl", str(TTL), "--grace", str(GRACE))
        second = None
        try:
            wait_for(lambda: stamps(log, "A"))
            pid = stamps(log, "A")[0][2]
            lease_end = lease_end_after_a_renewal(server.url)
            server.process.send_signal(signal.SIGSTOP)  # renewals now hang unanswered
            try:
                wait_for(lambda: dead(pid))
                died_by = time.monotonic()
                second = start_run(server.url, log, "B", "--wait", "20", once=True)
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert died_by < lease_end, f"child lived {died_by - lease_end:.3f} s past the lease"
            assert first.wait(timeout=20) == EXIT_LOCK_LOST
            assert second.wait(timeout=30) == 0
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
    (b_start,) = [t for event, t, _ in stamps(log, "B") if event == "start"]
    assert max(t for _, t, _ in stamps(log, "A")) < b_start
