"""Contract item 1: at no instant do more than ``limit`` owners hold a resource.

The memory and file stores cannot be shared across processes, so contention comes from
threads (sync clients) and tasks (async clients), each doing read-modify-write cycles on
a file on disk with a pause between the read and the write to provoke lost updates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import lockd
from tests.conformance.helpers import NS, start

THREADS = 4
ROUNDS = 25


class Counter:
    """A counter in a file, updated with a deliberately racy read, pause, write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("0")
        self._guard = threading.Lock()
        self.inside = 0
        self.max_inside = 0

    def enter(self) -> None:
        with self._guard:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)

    def leave(self) -> None:
        with self._guard:
            self.inside -= 1

    def read(self) -> int:
        return int(self.path.read_text())

    def write(self, value: int) -> None:
        self.path.write_text(str(value))


def _increment_many(lock: lockd.Lock, counter: Counter) -> None:
    for _ in range(ROUNDS):
        with lock:
            counter.enter()
            value = counter.read()
            time.sleep(0.001)  # widen the race window
            counter.write(value + 1)
            counter.leave()


def test_threads_on_one_client_lose_no_update(client: lockd.Client, tmp_path: Path) -> None:
    counter = Counter(tmp_path / "counter")
    workers = [
        start(lambda: _increment_many(client.lock("counter", ttl=5), counter))
        for _ in range(THREADS)
    ]
    for worker in workers:
        worker.outcome(timeout=30)
    assert counter.read() == THREADS * ROUNDS
    assert counter.max_inside == 1
    assert not client.lock("counter").locked()


def test_threads_on_separate_clients_lose_no_update(store_url: str, tmp_path: Path) -> None:
    counter = Counter(tmp_path / "counter")

    def run() -> None:
        with lockd.Client(store_url) as own:
            _increment_many(own.lock("counter", ttl=5), counter)

    workers = [start(run) for _ in range(THREADS)]
    for worker in workers:
        worker.outcome(timeout=30)
    assert counter.read() == THREADS * ROUNDS
    assert counter.max_inside == 1


async def test_tasks_lose_no_update(aclient: lockd.AsyncClient, tmp_path: Path) -> None:
    counter = Counter(tmp_path / "counter")

    async def run() -> None:
        lock = aclient.lock("counter", ttl=5)
        for _ in range(ROUNDS):
            async with lock:
                counter.enter()
                value = counter.read()
                await asyncio.sleep(0.001)  # other tasks run here
                counter.write(value + 1)
                counter.leave()

    await asyncio.gather(*(run() for _ in range(THREADS)))
    assert counter.read() == THREADS * ROUNDS
    assert counter.max_inside == 1
    assert not await aclient.lock("counter").locked()


async def test_backend_grants_one_owner_at_a_time(backend: lockd.Backend) -> None:
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    tokens: list[int] = []

    async def run(owner: str) -> None:
        for _ in range(10):
            grant = await backend.acquire(NS, "one", owner, ttl=5, wait=5)
            inside.append(owner)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            tokens.append(grant.token)
            await asyncio.sleep(0)
            info = await backend.inspect(NS, "one")
            assert [h.owner for h in info.holders] == [owner]
            inside.remove(owner)
            assert await backend.release(NS, "one", owner, grant.token) == 0

    await asyncio.gather(*(run(f"owner-{i}") for i in range(5)))
    assert overlaps == []
    assert len(tokens) == 50
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 50
    assert (await backend.inspect(NS, "one")).holders == ()


PROCESSES = 4
_WORKER = """
import sys, time
import lockd
url, counter, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
with lockd.Client(url) as client:
    lock = client.lock("processes", ttl=10)
    for _ in range(rounds):
        with lock:
            with open(counter) as f:
                value = int(f.read())
            time.sleep(0.001)
            with open(counter, "w") as f:
                f.write(str(value + 1))
"""


def test_processes_lose_no_update(store_url: str, tmp_path: Path) -> None:
    """Separate OS processes, wherever the store can be reached from several."""
    import subprocess
    import sys

    with lockd.Client(store_url) as probe:
        if not probe.capabilities.shared_across_processes:
            # Refused by design (StoreBusy): covered by the threads and tasks tests above.
            assert store_url.startswith(("memory://", "file://"))
            return
    counter = tmp_path / "counter"
    counter.write_text("0")
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, store_url, str(counter), str(ROUNDS)])
        for _ in range(PROCESSES)
    ]
    try:
        codes = [w.wait(timeout=120) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert codes == [0] * PROCESSES
    assert int(counter.read_text()) == PROCESSES * ROUNDS
