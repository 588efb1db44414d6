"""What the SDK's lighter call path must keep: interrupted calls, renewal timing,
request ids in a forked child, and the I/O loop with or without uvloop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

import lockd
from lockd._runtime import _new_loop
from lockd._session import _request_id


@pytest.fixture
def url() -> str:
    """A fresh memory store."""
    return f"memory://overhead-{uuid.uuid4().hex}"


@pytest.fixture
def clients(url: str) -> Iterator[tuple[lockd.Client, lockd.Client]]:
    """Two clients on one store."""
    with lockd.Client(url) as first, lockd.Client(url) as second:
        yield first, second


def test_ctrl_c_during_a_blocked_acquire_leaves_the_queue(
    clients: tuple[lockd.Client, lockd.Client],
) -> None:
    mine, other = clients
    holder = other.lock("k", ttl=5)
    holder.acquire()
    main = threading.get_ident()
    interrupt = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            mine.lock("k", ttl=5).acquire()
    finally:
        interrupt.join()
    holder.release()
    # The interrupted waiter neither holds the lock nor keeps a place in the queue.
    third = other.lock("k", ttl=5, owner="third")
    assert third.acquire(wait=2).token is not None
    assert [h.owner for h in other.inspect("k").holders] == ["third"]
    third.release()


def test_extend_to_a_shorter_ttl_renews_in_time(url: str) -> None:
    with lockd.Client(url) as client:
        lock = client.lock("k", ttl=30)
        with lock:
            lock.extend(0.6)  # the renewal due in 10 s must now come within 0.2 s
            time.sleep(1.2)
            assert lock.state is lockd.LockState.HELD
            assert lock.owned()


def test_extend_without_renewal_moves_the_ttl_check(url: str) -> None:
    with lockd.Client(url) as client:
        lock = client.lock("k", ttl=0.5, renew=False)
        lock.acquire()
        lock.extend(1.5)
        time.sleep(0.8)
        assert lock.state is lockd.LockState.HELD
        assert lock.lost.wait(2)
        assert lock.state is lockd.LockState.LOST


def test_lost_read_before_or_after_a_revocation_is_set(
    clients: tuple[lockd.Client, lockd.Client],
) -> None:
    mine, other = clients
    lock = mine.lock("k", ttl=5)
    lock.acquire()
    before = lock.lost
    assert not before.is_set()
    other.force_release("k")
    assert before.wait(2)
    assert lock.lost is before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_other_request_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, _request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = _request_id()
    assert child and child.split("-")[0] != mine.split("-")[0]


def test_io_loop_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    loop = _new_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


def test_io_loop_uses_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = _new_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


async def test_async_calls_from_many_tasks_each_get_their_own_result(url: str) -> None:
    async with lockd.AsyncClient(url) as client:

        async def hold(name: str) -> int | None:
            async with client.lock(name, ttl=5) as lock:
                info = await client.inspect(name)
                assert [h.token for h in info.holders] == [lock.token]
                return lock.token

        tokens = await asyncio.gather(*(hold(f"k{i}") for i in range(20)))
        assert None not in tokens and len(set(tokens)) == 20
