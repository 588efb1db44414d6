"""The redis backend under faults: kill -9 and restart under traffic, a holder paused past its ttl.

Every Redis, holder and worker is a real process this module started; each is stopped
by its PID on the way out, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lockd
import redis
from tests.redisproc import running_redis

CHILD_TIMEOUT = 30.0
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")

WORKER = """
import os
import sys
import uuid
from pathlib import Path

import lockd

url, shared = sys.argv[1], Path(sys.argv[2])
inside, grants, errors = shared / "inside", shared / "grants.log", shared / "errors.log"


def note(exc):
    with open(errors, "a") as out:
        out.write(type(exc).__name__ + "\\n")


client = lockd.Client(url)
(shared / f"ready-{os.getpid()}").touch()
while not (shared / "stop").exists():
    lock = client.lock("hot", ttl=3, wait=0.5, owner=uuid.uuid4().hex)  # a new client each time
    try:
        lock.acquire()
    except lockd.LockError as exc:  # Redis down: BackendUnavailable; busy: AcquireTimeout
        note(exc)
        continue
    try:
        # Mutual exclusion check: a second holder inside at the same time cannot create it.
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        try:
            # Holders append in the order they were granted (one at a time).
            with open(grants, "a") as out:
                out.write(f"{lock.token}\\n")
        finally:
            os.close(fd)
            os.unlink(inside)
    finally:
        try:
            lock.release()
        except lockd.LockError as exc:
            note(exc)
client.close()
"""

FENCE = """
local highest = tonumber(redis.call('HGET', KEYS[1], 'highest') or '0')
local token = tonumber(ARGV[1])
if token < highest then return 0 end
redis.call('HSET', KEYS[1], 'highest', token, 'value', ARGV[2])
return 1
"""
"""A token-checking resource: accepts a write only if its token is the highest seen."""

HOLDER = """
import json
import sys
import threading

import redis

import lockd

url, fence_text = sys.argv[1], sys.argv[2]
resource = redis.Redis.from_url(url)
fence = resource.register_script(fence_text)
lost_called = threading.Event()
client = lockd.Client(url)
lock = client.lock("job", ttl=1.0, on_lost=lambda exc: lost_called.set())
lock.acquire()
token = lock.token
first = fence(keys=["resource:job"], args=[token, "holder-before"])
print(json.dumps({"token": token, "first": first}), flush=True)
sys.stdin.readline()  # paused here (SIGSTOP) by the test; "go" once resumed
stale = fence(keys=["resource:job"], args=[token, "holder-after"])  # the write it was about to do
lost = lock.lost.wait(10)
on_lost = lost_called.wait(10)
try:
    lock.release()
    release = "released"
except lockd.LockLost:
    release = "LockLost"
print(json.dumps({"stale": stale, "lost": lost, "on_lost": on_lost, "release": release,
                  "state": lock.state.value}), flush=True)
client.close()
resource.close()
"""


@contextlib.contextmanager
def children(count: int, *args: str, out: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` Python children writing to files in ``out``; killed and reaped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            with (
                (out / f"child-{i}.out").open("wb") as stdout,
                (out / f"child-{i}.err").open("wb") as stderr,
            ):
                procs.append(
                    subprocess.Popen([sys.executable, *args], stdout=stdout, stderr=stderr)
                )
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(CHILD_TIMEOUT)


def wait_for(what: str, check: Callable[[], bool], timeout: float = CHILD_TIMEOUT) -> None:
    """Poll ``check`` until it holds; fail with ``what`` if it does not in time."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_lines(path: Path) -> list[str]:
    """The complete lines of a file children append to (none if it does not exist yet)."""
    if not path.exists():
        return []
    text = path.read_text()
    return text.split("\n")[:-1]


# --- kill -9 and restart under traffic ---------------------------------------------------------


def test_kill_9_and_restart_under_traffic_keeps_tokens_rising_and_holders_exclusive(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    grants, errors = shared / "grants.log", shared / "errors.log"

    def granted() -> int:
        return len(read_lines(grants))

    with (
        running_redis(*DURABLE) as server,
        children(3, str(script), server.url, str(shared), out=tmp_path) as workers,
    ):

        def alive() -> bool:
            dead = [(p.pid, p.returncode) for p in workers if p.poll() is not None]
            assert not dead, f"workers exited early: {dead}: {stderr_of(tmp_path)}"
            return True

        def granted_at_least(count: int) -> Callable[[], bool]:
            return lambda: alive() and granted() >= count

        wait_for("the workers", lambda: alive() and len(list(shared.glob("ready-*"))) == 3)
        wait_for("first grants", granted_at_least(40))
        for _ in range(2):
            more = granted_at_least(granted() + 40)
            errors.unlink(missing_ok=True)
            server.kill()
            # The workers get lockd errors while Redis is down, not a hang or a driver error.
            wait_for(
                "a BackendUnavailable",
                lambda: alive() and "BackendUnavailable" in read_lines(errors),
            )
            server.restart()
            wait_for("grants after the restart", more)
        (shared / "stop").touch()
        for proc in workers:
            assert proc.wait(CHILD_TIMEOUT) == 0, stderr_of(tmp_path)

        tokens = [int(line) for line in read_lines(grants)]
        assert len(tokens) >= 120
        regressions = [(a, b) for a, b in itertools.pairwise(tokens) if b <= a]
        assert not regressions, f"tokens went back or repeated: {regressions[:10]}"
        assert not (shared / "inside").exists()
        with lockd.Client(server.url) as client:
            info = client.inspect("hot")
            assert info.last_token >= tokens[-1]
            assert info.holders == ()


def stderr_of(folder: Path) -> str:
    """The workers' stderr (less the retry warnings), for failure messages."""
    texts = []
    for path in sorted(folder.glob("child-*.err")):
        lines = [x for x in path.read_text().splitlines() if "; retrying" not in x]
        texts.append("\n".join(lines)[-6000:])
    return "\n".join(texts)


# --- a holder paused past its ttl ------------------------------------------------------------


def test_holder_paused_past_its_ttl_finds_its_lock_lost_and_its_stale_write_refused(
    tmp_path: Path,
) -> None:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    with running_redis() as server:
        holder = subprocess.Popen(
            [sys.executable, str(script), server.url, FENCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            first = json.loads(holder.stdout.readline() or b"null")
            assert first is not None, holder.stderr.read() if holder.stderr else ""
            assert first["first"] == 1  # the holder wrote with its token

            holder.send_signal(signal.SIGSTOP)
            with lockd.Client(server.url) as client, redis.Redis.from_url(server.url) as direct:
                fence = direct.register_script(FENCE)
                lock = client.lock("job", ttl=10, wait=15)
                # Granted only once the paused holder's ttl has run out in Redis.
                lock.acquire()
                assert lock.token is not None and lock.token > first["token"]
                assert fence(keys=["resource:job"], args=[lock.token, "successor"]) == 1

                holder.stdin.write(b"go\n")
                holder.stdin.flush()
                holder.send_signal(signal.SIGCONT)
                out, err = holder.communicate(timeout=CHILD_TIMEOUT)
                assert holder.returncode == 0, err.decode()
                result = json.loads(out.decode().strip().splitlines()[-1])

                assert result["stale"] == 0  # the resource refused the stale token
                assert result["lost"] is True
                assert result["on_lost"] is True
                assert result["release"] == "LockLost"
                assert result["state"] == "lost"
                assert direct.hget("resource:job", "value") == b"successor"
                # The old holder's release attempt did not touch the successor's hold.
                info = client.inspect("job")
                assert [(h.owner, h.token) for h in info.holders] == [(lock.owner, lock.token)]
                lock.release()
        finally:
            if holder.poll() is None:
                holder.send_signal(signal.SIGCONT)
                holder.kill()
            holder.communicate(timeout=CHILD_TIMEOUT)


# --- a restart that lost the counters --------------------------------------------------------


def take_token(client: lockd.Client, name: str) -> int:
    """Acquire and release ``name`` once (retrying while Redis comes back); the token."""
    with client.lock(name, ttl=5, wait=10) as lock:
        assert lock.token is not None
        return lock.token


def test_tokens_rise_after_a_restart_that_lost_everything() -> None:
    with running_redis() as server, lockd.Client(server.url) as client:  # no persistence
        before = [take_token(client, "job") for _ in range(3)]
        server.kill()
        server.restart()
        after = take_token(client, "job")
        assert after > max(before), f"token {after} after {before}: fencing went back"


def test_tokens_rise_after_a_restart_from_an_older_snapshot() -> None:
    with running_redis() as server, lockd.Client(server.url) as client:
        take_token(client, "job")
        with redis.Redis(port=server.port) as direct:
            direct.save()  # an RDB snapshot, older than the grants below
        issued = [take_token(client, "job") for _ in range(5)]
        server.kill()
        server.restart()  # loads the snapshot: the counter is back five grants
        with redis.Redis(port=server.port) as direct:
            assert direct.exists("lockd:{default:job}:token")
        after = take_token(client, "job")
        assert after > max(issued), f"token {after} after {issued}: fencing went back"
