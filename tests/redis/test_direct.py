"""The redis backend's direct path: sync callers acquire and release in their own thread.

These check what the path must keep: it does not need the I/O loop, a hold granted on
it is renewed like any other, a queued acquire goes on waiting on the loop, an
interrupted acquire is undone, and a store that fails under it is retried with the same
request id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import lockd
from lockd._runtime import runtime
from lockd.backends.base import AcquireRequest
from lockd.backends.redis import RedisBackend
from lockd.backends.redis_direct import RedisDirect
from tests.interrupts import ctrl_c_after, io_loop_blocked
from tests.redisproc import RedisProcess, running_redis


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    with running_redis() as started:
        yield started


@pytest.fixture
def client(server: RedisProcess) -> Iterator[lockd.Client]:
    with lockd.Client(server.url) as opened:
        yield opened


def test_sync_calls_do_not_wait_for_a_busy_io_loop(client: lockd.Client) -> None:
    lock = client.lock("busy-loop", ttl=5)
    lock.acquire()  # the first grant lets the loop subscribe and start watching
    lock.release()
    with io_loop_blocked():
        started = time.monotonic()
        for _ in range(20):
            lock.acquire()
            lock.release()
        took = time.monotonic() - started
    assert took < 5, "sync acquire/release waited for the blocked I/O loop"
    assert not client.inspect("busy-loop").holders


def test_a_direct_hold_is_renewed_and_its_loss_is_signalled(
    client: lockd.Client, server: RedisProcess
) -> None:
    lock = client.lock("renewed", ttl=0.6)
    lock.acquire()
    token = lock.token
    time.sleep(1.5)  # more than twice the ttl: only renewals keep it
    info = client.inspect("renewed")
    assert [(h.owner, h.token) for h in info.holders] == [(lock.owner, token)]
    assert lock.state is lockd.LockState.HELD
    lock.release()
    assert not client.inspect("renewed").holders

    lock.acquire()
    redis_cli = __import__("redis").Redis.from_url(server.url)
    try:
        redis_cli.flushall()  # the store forgets the hold: the next renewal finds it gone
    finally:
        redis_cli.close()
    assert lock.lost.wait(2.0)
    with pytest.raises(lockd.LockLost):
        lock.release()


def test_a_queued_direct_acquire_is_granted_in_turn(client: lockd.Client) -> None:
    first = client.lock("queue", ttl=5, owner="first")
    second = client.lock("queue", ttl=5, owner="second")
    first.acquire()
    granted: list[int | None] = []

    def wait_in_line() -> None:
        second.acquire(wait=10)
        granted.append(second.token)

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    deadline = time.monotonic() + 5
    while not client.inspect("queue").waiters and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [w.owner for w in client.inspect("queue").waiters] == ["second"]
    first_token = first.token
    first.release()
    waiter.join(5)
    assert granted and granted[0] is not None and first_token is not None
    assert granted[0] > first_token
    second.release()


def test_an_interrupted_direct_acquire_is_undone(
    client: lockd.Client, server: RedisProcess
) -> None:
    lock = client.lock("interrupted", ttl=30, wait=0)
    lock.acquire()  # warm: a connection is open
    lock.release()
    server.pause()  # the next script hangs in the caller's thread
    try:
        with ctrl_c_after(0.3), pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        server.resume()
    # Redis ran the acquire once resumed; the abandon sent after it gives it back.
    deadline = time.monotonic() + 5
    while client.inspect("interrupted").holders and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not client.inspect("interrupted").holders
    assert lock.state is lockd.LockState.RELEASED


def test_a_direct_call_on_a_restarting_store_is_retried_once(
    client: lockd.Client, server: RedisProcess
) -> None:
    lock = client.lock("restart", ttl=30, wait=10)
    lock.acquire()
    lock.release()
    server.kill()
    restarter = threading.Timer(0.5, server.restart)
    restarter.start()
    try:
        lock.acquire()  # fails on the dead connection, then retried until Redis is back
    finally:
        restarter.join()
    info = client.inspect("restart")
    assert [(h.owner, h.count) for h in info.holders] == [(lock.owner, 1)]
    lock.release()
    assert not client.inspect("restart").holders


def test_an_interrupted_queued_direct_acquire_leaves_the_queue(client: lockd.Client) -> None:
    holder = client.lock("line", ttl=30, owner="holder")
    holder.acquire()
    waiter = client.lock("line", ttl=30, wait=20)
    with ctrl_c_after(0.3), pytest.raises(KeyboardInterrupt):
        waiter.acquire()  # queued, blocked in BLPOP in this thread
    # Gone well before its waiter lease (3 s) would have dropped it: it was abandoned.
    deadline = time.monotonic() + 1
    while client.inspect("line").waiters and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not client.inspect("line").waiters
    holder.release()  # with the waiter gone, nobody is granted
    assert not client.inspect("line").holders


def test_direct_paths_replace_dropped_connections_without_end(client: lockd.Client) -> None:
    """A connection that fails is dropped and a new one made: more of them over a
    process's life than a driver pool allows (100) must not stop either path."""
    backend = client._session.backend
    assert isinstance(backend, RedisBackend)
    direct, connections = backend.direct, backend._connections
    assert isinstance(direct, RedisDirect) and connections is not None

    async def through_the_loop() -> None:
        await backend.acquire("default", "replaced", "me", ttl=5, wait=0)
        assert await backend.release("default", "replaced", "me", None) == 0
        while connections._idle:  # as if it failed: the next call makes a new one
            await connections._idle.pop().disconnect()

    for _ in range(120):
        grant = direct.acquire(AcquireRequest("default", "replaced", "me", 5.0, 0, 1, None))
        assert direct.release("default", "replaced", "me", grant.token, None) == 0
        while direct._idle:  # as if it failed: the next call makes a new one
            direct._idle.pop().disconnect()
        runtime().submit(through_the_loop()).result(5)
