"""The fault harness itself: the proxy's modes and the switch of the in-process stores."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

import lockd
from lockd._runtime import runtime
from tests.faults import Outage, wait_until
from tests.faults.proxy import FAULTY, SWITCHES, Proxy, switch
from tests.redisproc import RedisProcess

T = TypeVar("T")
PING = b"*1\r\n$4\r\nPING\r\n"


def _connect(proxy: Proxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout)


def _ping(sock: socket.socket) -> bytes:
    sock.sendall(PING)
    return sock.recv(64)


def _is_dropped(sock: socket.socket) -> bool:
    """True when the peer has closed or reset the connection."""
    try:
        sock.sendall(PING)
        return sock.recv(64) == b""
    except OSError:
        return True


def test_the_proxy_forwards_and_refuses(shared_redis: RedisProcess) -> None:
    with Proxy(shared_redis.port) as proxy:
        first = _connect(proxy)
        assert _ping(first) == b"+PONG\r\n"
        proxy.cut("refuse")
        assert _is_dropped(first)
        with _connect(proxy) as refused:
            assert _is_dropped(refused)
        proxy.restore()
        with _connect(proxy) as again:
            assert _ping(again) == b"+PONG\r\n"
        first.close()


def test_the_proxy_blackholes_then_drops_what_it_held(shared_redis: RedisProcess) -> None:
    with Proxy(shared_redis.port) as proxy:
        old = _connect(proxy)
        assert _ping(old) == b"+PONG\r\n"
        proxy.cut("blackhole")
        old.settimeout(0.3)
        old.sendall(PING)
        with pytest.raises(TimeoutError):
            old.recv(64)  # no answer: the request hangs
        hung = _connect(proxy, timeout=0.3)  # the connection is taken, never served
        hung.sendall(PING)
        with pytest.raises(TimeoutError):
            hung.recv(64)
        proxy.restore()
        old.settimeout(2)
        hung.settimeout(2)
        assert _is_dropped(old)
        assert _is_dropped(hung)
        with _connect(proxy) as fresh:
            assert _ping(fresh) == b"+PONG\r\n"
        old.close()
        hung.close()


def test_the_proxy_pause_holds_bytes_until_restored(shared_redis: RedisProcess) -> None:
    with Proxy(shared_redis.port) as proxy, _connect(proxy) as sock:
        assert _ping(sock) == b"+PONG\r\n"
        proxy.pause()
        sock.settimeout(0.3)
        sock.sendall(PING)
        with pytest.raises(TimeoutError):
            sock.recv(64)
        proxy.restore()
        sock.settimeout(2)
        assert sock.recv(64) == b"+PONG\r\n"  # held, then delivered on the same connection


def test_the_proxy_leaves_nothing_behind(shared_redis: RedisProcess) -> None:
    before = set(threading.enumerate())
    proxy = Proxy(shared_redis.port)
    sock = _connect(proxy)
    assert _ping(sock) == b"+PONG\r\n"
    assert proxy.connections() == 1
    proxy.close()
    assert _is_dropped(sock)
    sock.close()
    assert set(threading.enumerate()) <= before
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy, timeout=0.5).close()


def test_a_connection_accepted_as_the_proxy_closes_is_closed(shared_redis: RedisProcess) -> None:
    """A socket accepted but not yet wrapped when the proxy closes is closed, not leaked.

    The proxy's shutdown is made to start just before asyncio's task that wraps the
    accepted socket takes its first step: the interleaving of a client connecting at
    teardown, which once left a socket to the GC and failed a test on its warning.
    """
    proxy = Proxy(shared_redis.port)
    interleaved = threading.Event()
    shutdowns: list[asyncio.Task[None]] = []

    def shut_down_first(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        if getattr(coro, "__name__", "") == "_accept_connection2":
            loop.set_task_factory(None)
            shutdowns.append(loop.create_task(proxy._shutdown()))  # steps before coro
            interleaved.set()
        return asyncio.Task(coro, loop=loop, **kw)

    async def install() -> None:
        asyncio.get_running_loop().set_task_factory(shut_down_first)

    proxy._control(install())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with _connect(proxy) as sock:
            sock.settimeout(2)
            assert _is_dropped(sock)
        assert interleaved.wait(2)
        proxy.close()
        gc.collect()
    assert not [w.message for w in caught if issubclass(w.category, ResourceWarning)]


def _on_io(coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
    """Run ``coro`` on lockd's I/O loop, where the stores live."""
    return runtime().submit(coro).result(timeout)


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_the_switch_fails_every_call_while_cut(kind: str, tmp_path: Path) -> None:
    inner = f"memory://sw-{uuid.uuid4().hex}" if kind == "memory" else f"file://{tmp_path / 's'}"
    url = FAULTY + inner
    cut = switch(url)
    with lockd.Client(inner) as direct:
        backend = _on_io(runtime().open_store(url))
        try:
            _on_io(backend.acquire("default", "n", "a", ttl=5, wait=0))
            assert direct.inspect("n").holders[0].owner == "a"  # one store, two views
            waiting = runtime().submit(backend.acquire("default", "n", "b", ttl=5, wait=10))
            wait_until(lambda: len(direct.inspect("n").waiters) == 1, 5)
            cut.cut()
            with pytest.raises(lockd.BackendUnavailable):
                waiting.result(5)  # the call in flight fails too
            with pytest.raises(lockd.BackendUnavailable):
                _on_io(backend.inspect("default", "n"))
            info = direct.inspect("n")
            assert not info.waiters  # the store was not left with the cut call's waiter
            assert info.holders[0].owner == "a"
            cut.restore()
            assert _on_io(backend.release("default", "n", "a", None)) == 0
            assert not direct.inspect("n").locked
        finally:
            _on_io(runtime().close_store(backend))
            SWITCHES.pop(url, None)


def test_a_blackholed_switch_hangs_then_fails() -> None:
    inner = f"memory://sw-{uuid.uuid4().hex}"
    url = FAULTY + inner
    cut = switch(url)
    backend = _on_io(runtime().open_store(url))
    try:
        cut.cut("blackhole")
        call = runtime().submit(backend.acquire("default", "n", "a", ttl=5, wait=0))
        with pytest.raises(concurrent.futures.TimeoutError):
            call.result(0.3)
        cut.restore()
        with pytest.raises(lockd.BackendUnavailable):
            call.result(5)
        _on_io(backend.acquire("default", "n", "a", ttl=5, wait=0))
    finally:
        _on_io(runtime().close_store(backend))
        SWITCHES.pop(url, None)


def test_every_outage_cuts_and_restores(outage: Outage, observer: lockd.Client, name: str) -> None:
    with lockd.Client(outage.url) as client:
        client.inspect(name)
        outage.cut()
        start = time.monotonic()
        with pytest.raises(lockd.BackendUnavailable):
            client.inspect(name)
        assert time.monotonic() - start < 10
        observer.inspect(name)  # the store itself is up
        outage.restore()
        assert not client.inspect(name).locked
