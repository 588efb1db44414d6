"""RedLock's direct path: sync callers send each node's request from their own thread.

These check what the path must keep: an uncontended acquire and release do not need
the I/O loop; a queued acquire is handed to the loop as it stands (one place in each
node's queue, granted in turn); a paused node delays a grant by no more than the node
timeout; a node left out of a grant forgets the request; an interrupted acquire is undone
on every node.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import lockd
from lockd._runtime import runtime
from lockd.backends import redis as redis_backend
from lockd.backends import redis_wait
from lockd.backends.base import AcquireRequest
from lockd.backends.redis import RedisBackend
from lockd.backends.redlock import RedlockBackend
from tests.conformance.helpers import NS
from tests.interrupts import ctrl_c_after, io_loop_blocked
from tests.redisproc import RedisProcess
from tests.redlock import redlock_url


@pytest.fixture
def client(redlock_nodes: list[RedisProcess]) -> Iterator[lockd.Client]:
    with lockd.Client(redlock_url(redlock_nodes)) as opened:
        yield opened


def _wait_for(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_uncontended_sync_calls_do_not_wait_for_a_busy_io_loop(client: lockd.Client) -> None:
    lock = client.lock("busy-loop", ttl=5)
    lock.acquire()  # the first acquire lets the loop subscribe on every node
    lock.release()
    tokens: list[int] = []
    with io_loop_blocked():
        started = time.monotonic()
        for _ in range(20):
            lock.acquire()
            assert lock.token is not None
            tokens.append(lock.token)
            lock.release()
        took = time.monotonic() - started
    assert took < 5, "sync acquire/release on redlock waited for the blocked I/O loop"
    assert tokens == sorted(set(tokens)), "every grant has a new, higher token"
    assert not client.inspect("busy-loop").holders


def test_a_queued_direct_acquire_keeps_one_place_and_is_granted_in_turn(
    client: lockd.Client, redlock_nodes: list[RedisProcess]
) -> None:
    first = client.lock("queue", ttl=5, owner="first")
    second = client.lock("queue", ttl=5, owner="second")
    third = client.lock("queue", ttl=5, owner="third")
    first.acquire()  # also lets the loop subscribe, so the waiters below start directly
    granted: list[str] = []

    def wait_in_line(lock: lockd.Lock) -> None:
        lock.acquire(wait=10)
        granted.append(lock.owner)
        lock.release()

    waiters: list[threading.Thread] = []

    def queued() -> bool:
        return len(client.inspect("queue").waiters) == len(waiters)

    for lock in (second, third):
        waiters.append(threading.Thread(target=wait_in_line, args=(lock,)))
        waiters[-1].start()
        _wait_for(queued)
    assert [w.owner for w in client.inspect("queue").waiters] == ["second", "third"]
    for node in redlock_nodes:  # each node queued each waiter once, in arrival order

        async def node_waiters(url: str = node.url) -> list[str]:
            single = RedisBackend(url)
            await single.open()
            try:
                return [w.owner for w in (await single.inspect(NS, "queue")).waiters]
            finally:
                await single.aclose()

        assert runtime().submit(node_waiters()).result(5) == ["second", "third"]
    first.release()
    for waiter in waiters:
        waiter.join(10)
    assert granted == ["second", "third"]
    assert not client.inspect("queue").holders


def test_a_paused_node_delays_a_direct_grant_by_no_more_than_the_node_timeout(
    client: lockd.Client, redlock_nodes: list[RedisProcess]
) -> None:
    lock = client.lock("one-paused", ttl=1)  # node timeout: 0.2 s
    lock.acquire()  # warm: every node has a connection, the loop is subscribed
    lock.release()
    redlock_nodes[0].pause()
    try:
        started = time.monotonic()
        lock.acquire()
        took = time.monotonic() - started
        assert lock.owned()
        lock.release()
    finally:
        redlock_nodes[0].resume()
    assert took < 1.0
    assert not client.inspect("one-paused").holders


def test_an_interrupted_direct_acquire_is_undone_on_every_node(
    client: lockd.Client, redlock_nodes: list[RedisProcess]
) -> None:
    lock = client.lock("interrupted", ttl=30, wait=0)
    lock.acquire()  # warm: every node has a connection
    lock.release()
    for node in redlock_nodes:
        node.pause()  # the next request hangs in the caller's thread
    try:
        with ctrl_c_after(0.1), pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        for node in redlock_nodes:
            node.resume()
    # The nodes ran the acquire once resumed; the abandon sent after it gives it back.
    _wait_for(lambda: not client.inspect("interrupted").holders)
    assert not client.inspect("interrupted").holders
    assert lock.state is lockd.LockState.RELEASED
    assert lock.acquire(wait=0)  # and nothing is left that would refuse a new grant
    lock.release()


def test_a_node_left_out_of_a_grant_forgets_the_request(
    client: lockd.Client, redlock_nodes: list[RedisProcess]
) -> None:
    """Granted by a majority while another owner holds one node: that node must drop the
    queued request, or it would later grant it to an owner that no longer waits (a hold
    nobody releases, which blocks that owner's next rounds there)."""
    other = RedisBackend(redlock_nodes[0].url)
    runtime().submit(other.open()).result(5)
    try:
        held = runtime().submit(other.acquire(NS, "left-out", "x", ttl=30, wait=0)).result(5)
        lock = client.lock("left-out", ttl=10)
        assert lock.acquire(wait=5)
        lock.release()

        def node0_waiters() -> list[str]:
            info = runtime().submit(other.inspect(NS, "left-out")).result(5)
            return [w.owner for w in info.waiters]

        _wait_for(lambda: not node0_waiters(), 2.0)
        assert node0_waiters() == []
        runtime().submit(other.release(NS, "left-out", "x", held.token)).result(5)
        info = runtime().submit(other.inspect(NS, "left-out")).result(5)
        assert info.holders == ()
        assert lock.acquire(wait=0)  # nothing stale stands in the way on any node
        lock.release()
    finally:
        runtime().submit(other.aclose()).result(5)


# --- one owner at a time for the state the loop and callers' threads share ---------------


def test_a_direct_acquire_waits_its_turn_at_the_request_tables(
    redlock_nodes: list[RedisProcess],
) -> None:
    backend = RedlockBackend(redlock_url(redlock_nodes), [n.url for n in redlock_nodes])
    runtime().submit(backend.open()).result(5)
    try:
        direct = backend.direct
        assert direct is not None
        req = AcquireRequest(NS, "tables", "a", ttl=5, wait=0, limit=1, request_id="r1")
        warm = runtime().submit(backend.acquire(NS, "tables", "a", ttl=5, wait=0)).result(5)
        # the nodes agree on the name's tokens now, so the direct path settles it alone
        runtime().submit(backend.release(NS, "tables", "a", warm.token)).result(5)
        granted: list[lockd.Grant] = []
        with backend._tables:  # as the loop holds them while it changes them
            worker = threading.Thread(target=lambda: granted.append(direct.acquire(req)))
            worker.start()
            worker.join(0.3)
            assert worker.is_alive(), "the caller's thread changed the tables meanwhile"
            assert "r1" not in backend._rounds
        worker.join(5)
        assert granted, "the direct acquire did not go on once the tables were free"
        release = backend.release(NS, "tables", "a", granted[0].token)
        assert runtime().submit(release).result(5) == 0
    finally:
        runtime().submit(backend.aclose()).result(5)


def test_a_wake_up_for_an_attempt_forgotten_meanwhile_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop's reader handles a node's wake-up while a caller's thread forgets that
    attempt (its direct acquire ended): the grant must not be kept for nobody."""
    node = RedisBackend("redis://127.0.0.1:1/0")  # its wake-up tables only: never opened
    node.watch("inbox.1", asyncio.Event())
    parse = redis_wait.delivered_grant

    def forgotten_while_parsing(item: str) -> list[Any] | None:
        caller = threading.Thread(target=node.forget_attempt, args=("inbox.1",))
        caller.start()
        caller.join(2)
        assert not caller.is_alive(), "the reader kept the tables while parsing"
        return parse(item)

    monkeypatch.setattr(redis_backend, "delivered_grant", forgotten_while_parsing)
    node._wake_up("inbox.1=5,1,1000,10")
    assert (node._wake, node._delivered) == ({}, {})
