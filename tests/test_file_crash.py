"""The file store across processes: kill -9, one process at a time, restart durability.

Each test runs the store's user in a real child process (a helper script written to
``tmp_path``), so a crash is a real ``SIGKILL`` and a restart is a real new open of the
same directory. Every child is killed and reaped, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lockd

CHILD_TIMEOUT = 30.0

CHURN = """
import sys
import lockd

url = sys.argv[1]
client = lockd.Client(url)
for i in range(3):
    lock = client.lock(f"long-{i}", ttl=60, owner=f"keeper-{i}", wait=0)
    lock.acquire()
    print(f"HOLD long-{i} keeper-{i} {lock.token}", flush=True)
print("READY", flush=True)
n = 0
while True:
    lock = client.lock(f"churn-{n % 4}", ttl=5, wait=0)
    lock.acquire()
    print(f"TOKEN {lock.token}", flush=True)
    lock.release()
    n += 1
"""

TRY_OPEN = """
import sys
import lockd

try:
    client = lockd.Client(sys.argv[1])
except lockd.StoreBusy as exc:
    print("BUSY", type(exc).__name__, isinstance(exc, lockd.BackendUnavailable), str(exc))
else:
    lock = client.lock("from-child", ttl=5, wait=0)
    lock.acquire()
    print("OPENED", lock.token)
    client.close()
"""

HOLD_AND_VANISH = """
import os
import sys
import lockd

client = lockd.Client(sys.argv[1])
lock = client.lock("short", ttl=float(sys.argv[2]), owner="ghost", renew=False, wait=0)
lock.acquire()
print(lock.token, flush=True)
os._exit(0)  # no close: the hold is not released
"""


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


@contextlib.contextmanager
def child(*args: str) -> Iterator[subprocess.Popen[str]]:
    """A child Python process whose stdout we read; killed and reaped on the way out."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(CHILD_TIMEOUT)
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def run_child(*args: str) -> str:
    """Run a child to the end and return its stdout (its stderr on failure)."""
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def store_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


# --- kill -9 ----------------------------------------------------------------------------------


def test_kill_9_keeps_holds_and_never_reuses_a_token(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    lines: queue.Queue[str | None] = queue.Queue()
    holds: dict[str, tuple[str, int]] = {}
    tokens: list[int] = []

    with child(str(script(tmp_path, "churn", CHURN)), url) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            with contextlib.suppress(ValueError, OSError):  # closed under us: test failed
                for line in stdout:
                    lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + CHILD_TIMEOUT
        while len(tokens) < 1000:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, (
                f"child died early: {proc.stderr.read() if proc.stderr else ''}"
            )
            word, *rest = line.split()
            if word == "HOLD":
                holds[rest[0]] = (rest[1], int(rest[2]))
            elif word == "TOKEN":
                tokens.append(int(rest[0]))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(CHILD_TIMEOUT) == -signal.SIGKILL
        # Everything the child printed before it died counts as "seen".
        while (line := lines.get(timeout=CHILD_TIMEOUT)) is not None:
            word, *rest = line.split()
            if word == "TOKEN":
                tokens.append(int(rest[0]))
        reader.join(CHILD_TIMEOUT)

    assert len(holds) == 3
    assert tokens == sorted(set(tokens)), "the live store handed out tokens out of order"
    seen = max(*tokens, *(token for _, token in holds.values()))

    with lockd.Client(url) as client:
        for name, (owner, token) in holds.items():
            info = client.inspect(name)
            assert [(h.owner, h.token) for h in info.holders] == [(owner, token)], name
            assert 0 < info.holders[0].ttl_left <= 60
            assert not client.lock(name, ttl=5).try_acquire(), f"{name} was free after kill -9"
        # The child held at most one churn name when it died (granted, maybe not yet
        # printed): if that hold survived, it is the newest grant of all.
        churn = {f"churn-{i}": client.inspect(f"churn-{i}").holders for i in range(4)}
        survivors = [h for holders in churn.values() for h in holders]
        assert len(survivors) <= 1, survivors
        assert all(h.token >= seen and 0 < h.ttl_left <= 5 for h in survivors), survivors
        issued = max(client.inspect(f"churn-{i}").last_token for i in range(4))
        assert issued >= seen
        free = [name for name, holders in churn.items() if not holders]
        for name in [*free, "new-1", "new-2"]:
            lock = client.lock(name, ttl=5, wait=0)
            lock.acquire()
            assert lock.token is not None
            assert lock.token > issued, f"token {lock.token} reused after kill -9 ({issued})"
            issued = lock.token
            lock.release()


# --- one process at a time --------------------------------------------------------------------


def test_second_process_gets_store_busy_naming_this_pid(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    try_open = str(script(tmp_path, "try_open", TRY_OPEN))
    with lockd.Client(url) as client:
        lock = client.lock("here", ttl=5, wait=0)
        lock.acquire()
        out = run_child(try_open, url)
        word, kind, is_unavailable, message = out.split(" ", 3)
        assert (word, kind, is_unavailable) == ("BUSY", "StoreBusy", "True")
        assert f"process {os.getpid()}" in message
        assert str(tmp_path / "store") in message
        assert lock.owned()  # the refused opener changed nothing
        lock.release()
    # Closed here: another process can open it now, and tokens go on.
    out = run_child(try_open, url)
    word, token = out.split()
    assert word == "OPENED"
    assert int(token) == 2


def test_clients_in_one_process_share_the_store(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    with lockd.Client(url) as first, lockd.Client(url) as second:
        lock = first.lock("shared", ttl=5, wait=0)
        lock.acquire()
        assert second.inspect("shared").locked  # the same open store, shared
        lock.release()


# --- restart durability -----------------------------------------------------------------------


def test_hold_of_a_vanished_process_lasts_its_ttl_after_restart(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    ttl = 1.0
    out = run_child(str(script(tmp_path, "vanish", HOLD_AND_VANISH)), url, str(ttl))
    ghost_token = int(out)

    before_open = time.monotonic()
    with lockd.Client(url) as client:
        after_open = time.monotonic()
        info = client.inspect("short")
        read_at = time.monotonic()
        assert [(h.owner, h.token) for h in info.holders] == [("ghost", ghost_token)]
        ttl_left = info.holders[0].ttl_left
        # The store restarted between before_open and after_open and gave the hold its
        # full ttl from then: never more, and never less than what remains of it.
        assert 0 < ttl_left <= ttl
        assert ttl_left >= ttl - (read_at - before_open)

        intruder = client.lock("short", ttl=5, wait=0)
        assert not intruder.try_acquire()

        # Safety: still held shortly before the ttl runs out.
        time.sleep(max(0.0, before_open + 0.7 * ttl - time.monotonic()))
        info = client.inspect("short")
        assert [(h.owner, h.token) for h in info.holders] == [("ghost", ghost_token)]
        assert not intruder.try_acquire()

        # Liveness: gone once the ttl has run out, and the next grant has a newer token.
        time.sleep(max(0.0, after_open + ttl + 0.05 - time.monotonic()))
        assert not client.inspect("short").locked
        intruder.acquire()
        assert intruder.token is not None
        assert intruder.token > ghost_token
        intruder.release()


def test_restart_keeps_the_token_counter(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    with lockd.Client(url) as client:
        lock = client.lock("counter", ttl=5, wait=0)
        for _ in range(3):
            lock.acquire()
            lock.release()
        last = client.inspect("counter").last_token
    assert last == 3
    with lockd.Client(url) as client:
        assert client.inspect("counter").last_token == last
        lock = client.lock("counter", ttl=5, wait=0)
        lock.acquire()
        assert lock.token == last + 1
        lock.release()


def test_released_hold_stays_released_after_restart(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    with lockd.Client(url) as client:
        lock = client.lock("gone", ttl=5, wait=0)
        lock.acquire()
        lock.release()
    with lockd.Client(url) as client:
        assert not client.inspect("gone").locked
