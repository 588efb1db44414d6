"""RedLock under node faults, against real redis-server processes killed or paused by the
PIDs the fixtures started: a minority down keeps the service going with one holder at a
time; a majority down stops grants with a clear error, and they resume when it returns.
"""

from __future__ import annotations

import threading
import time

import pytest

import lockd
from lockd import AcquireTimeout, BackendUnavailable, LockError
from lockd.backends.redis import RedisBackend
from tests.conformance.helpers import NS
from tests.redisproc import RedisProcess
from tests.redlock import redlock_url


class Traffic:
    """Threads taking one lock in turn, checking that nobody else is inside meanwhile."""

    def __init__(self, client: lockd.Client, workers: int = 4, ttl: float = 2.0) -> None:
        self.client = client
        self.ttl = ttl
        self.inside = 0
        self.overlaps = 0
        self.tokens: list[int] = []
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.guard = threading.Lock()
        self.threads = [threading.Thread(target=self._work) for _ in range(workers)]

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                with self.client.lock("hot", ttl=self.ttl, wait=10) as held:
                    token = held.token
                    assert token is not None
                    with self.guard:
                        self.inside += 1
                        self.overlaps += self.inside > 1
                        self.tokens.append(token)
                    time.sleep(0.002)
                    with self.guard:
                        self.inside -= 1
            except LockError as exc:  # a grant lost to the fault; the test checks counts
                self.failures.append(exc)
                time.sleep(0.05)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def grants_during(self, seconds: float) -> int:
        """How many critical sections ran in the next ``seconds``."""
        before = len(self.tokens)
        time.sleep(seconds)
        return len(self.tokens) - before


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_a_minority_down_keeps_one_holder_at_a_time(
    redlock_nodes: list[RedisProcess], fault: str
) -> None:
    with (
        lockd.Client(redlock_url(redlock_nodes)) as client,
        Traffic(client, ttl=1.0) as traffic,
    ):
        assert traffic.grants_during(0.5) > 0
        victim = redlock_nodes[0]
        victim.kill() if fault == "kill" else victim.pause()
        # Grants go on: a paused node costs each acquire and each release at most its
        # node timeout (0.2 s here), a dead one nothing. Ten or so fit in the window;
        # a loaded machine sees fewer, a stalled service at most the one in flight.
        assert traffic.grants_during(3.0) >= 2
        if fault == "pause":
            victim.resume()
        else:
            time.sleep(traffic.ttl)  # a node without persistence stays out for a ttl
            victim.restart()
        assert traffic.grants_during(0.5) > 0
    assert traffic.overlaps == 0
    assert traffic.tokens == sorted(set(traffic.tokens))  # strictly rising, in grant order


def test_a_majority_down_refuses_grants_then_recovers(redlock_nodes: list[RedisProcess]) -> None:
    with lockd.Client(redlock_url(redlock_nodes)) as client:
        holder = client.lock("job", ttl=1)
        first = holder.acquire()
        for node in redlock_nodes[1:]:
            node.kill()
        # The holder's renewals find no majority: its lock is lost within its ttl.
        assert holder.lost.wait(3), "the holder was not told that its lock is lost"
        other = client.lock("job", ttl=1, owner="other")
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="nodes"):
            other.acquire(wait=0.5)
        assert time.monotonic() - started < 10
        # The killed nodes come back empty, so they stay down past the longest ttl in use
        # (the documented way to restart a node): the surviving node's hold has ended by
        # then, and it takes part in the next grant, whose token is above the old one.
        time.sleep(1.0)
        for node in redlock_nodes[1:]:
            node.restart()
        again = other.acquire(wait=5)
        assert first.token is not None
        assert again.token is not None
        assert again.token > first.token
        other.release()


async def test_a_waiter_facing_a_split_gives_back_its_node(
    redlock_nodes: list[RedisProcess],
) -> None:
    """Two other owners each hold one node (as a split leaves them): nobody has a
    majority. A waiter gets the third node, gives it back when it gives up, and is
    granted once the split clears."""
    singles = [RedisBackend(node.url) for node in redlock_nodes]
    backend = lockd.connect(redlock_url(redlock_nodes))
    try:
        for single in singles:
            await single.open()
        await backend.open()
        for owner, single in zip(("p", "q"), singles[:2], strict=False):
            await single.acquire(NS, "split", owner, ttl=0.8, wait=0)
        with pytest.raises(AcquireTimeout):
            await backend.acquire(NS, "split", "w", ttl=5, wait=0.2)
        assert (await singles[2].inspect(NS, "split")).holders == ()
        started = time.monotonic()
        grant = await backend.acquire(NS, "split", "w", ttl=5, wait=5)
        assert time.monotonic() - started >= 0.3  # not before the split cleared
        info = await backend.inspect(NS, "split")
        assert [(h.owner, h.token) for h in info.holders] == [("w", grant.token)]
        await backend.release(NS, "split", "w", grant.token)
        assert (await backend.inspect(NS, "split")).holders == ()
    finally:
        await backend.aclose()
        for single in singles:
            await single.aclose()


def test_grants_wait_for_a_paused_majority_no_longer_than_the_node_timeout(
    redlock_nodes: list[RedisProcess],
) -> None:
    with lockd.Client(redlock_url(redlock_nodes)) as client:
        lock = client.lock("slow", ttl=1)
        for node in redlock_nodes[1:]:
            node.pause()
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                lock.acquire(wait=0)
            assert time.monotonic() - started < 8
        finally:
            for node in redlock_nodes[1:]:
                node.resume()
        with lock:
            assert lock.owned()
