"""Real crashes and pauses: the store killed (kill -9, by the PID we started) and
restarted after the ttl (item 4), and a holder process SIGSTOPped past its ttl (item 8)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lockd
from lockd import LockState
from tests.faults import (
    OUTAGE,
    SLACK,
    TTL,
    assert_live,
    background,
    holder_of,
    restart_server,
    wait_until,
)
from tests.redisproc import running_redis
from tests.serverproc import running_server

# --- item 4 with real crashes: kill -9 the store, restart it after the ttl -------------

DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


class Crashable:
    """A store process a test can kill -9 and start again."""

    def __init__(self, url: str, kill: Callable[[], object], start: Callable[[], object]) -> None:
        self.url, self.kill, self.start = url, kill, start


@pytest.fixture(params=["redis-aof", "served-file"])
def crashable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Crashable]:
    """A durable Redis (appendfsync always), or ``lockd serve`` on a file store."""
    if request.param == "redis-aof":
        with running_redis(*DURABLE) as server:
            yield Crashable(server.url, server.kill, server.restart)
    else:
        with running_server(f"file://{tmp_path / 'store'}") as served:
            yield Crashable(
                served.url, lambda: served.stop(signal.SIGKILL), lambda: restart_server(served)
            )


def test_a_grant_made_after_a_crash_and_restart_is_live(crashable: Crashable) -> None:
    with lockd.Client(crashable.url) as client, lockd.Client(crashable.url) as observer:
        first = client.lock("crash", ttl=TTL, owner="me")
        first.acquire()
        crashable.kill()
        wait_until(lambda: first.state is LockState.LOST, TTL + SLACK)
        with pytest.raises(lockd.LockLost):
            first.release()
        lock = client.lock("crash", ttl=TTL, wait=15, owner="me")
        with background(lock.acquire) as acquired:
            time.sleep(OUTAGE)  # the acquire keeps trying for longer than the ttl
            crashable.start()
            acquired.result(20)
        assert_live(lock, observer)
        lock.release()
        assert holder_of(observer, "crash") is None


# --- item 8's pause: a holder SIGSTOPped past its ttl must not read held -------------

HOLDER = """
import sys
import threading

import lockd
from lockd._runtime import runtime

client = lockd.Client("memory://paused")
lock = client.lock("n", ttl=float(sys.argv[1]))
lock.acquire()
release_loop = threading.Event()


async def block_loop():
    release_loop.wait(30)


print("held", flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "block":  # the watchdog cannot run until "unblock"
        blocked = runtime().submit(block_loop())
        print("blocked", flush=True)
    elif command == "unblock":
        release_loop.set()
        blocked.result(5)
        print("unblocked", flush=True)
    elif command == "state":
        print(lock.state.value, flush=True)
"""


def test_a_holder_paused_past_its_ttl_does_not_read_held() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(TTL)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:

        def ask(command: str) -> str:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(command + "\n")
            child.stdin.flush()
            return child.stdout.readline().strip()

        assert child.stdout.readline().strip() == "held"
        assert ask("state") == "held"
        # Stopped with its I/O loop busy, so that on waking the caller reads the state
        # before the watchdog can have noticed anything: the order that shows the bug.
        assert ask("block") == "blocked"
        child.send_signal(signal.SIGSTOP)
        time.sleep(TTL * 1.5)
        child.stdin.write("state\n")
        child.stdin.flush()
        child.send_signal(signal.SIGCONT)
        assert child.stdout.readline().strip() == "lost"
        assert ask("unblock") == "unblocked"
        assert ask("state") == "lost"
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait(10)
        child.stdin.close()
        child.stdout.close()
