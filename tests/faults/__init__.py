"""Fault tests: stores cut off, paused or killed under a client that holds locks."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Literal

import httpx

import lockd
from lockd import LockState
from lockd._lease import RENEW_FRACTION, SLOW_FRACTION, SLOW_MAX
from tests.faults.proxy import Proxy, Switch
from tests.serverproc import ServerProcess

Cut = Literal["refuse", "blackhole"]
KINDS = ["memory", "file", "redis", "http", "redlock3"]
"""Every store the outage tests run on."""
TTL = 1.0
OUTAGE = 1.6
"""Longer than the ttl: every lease the store had ends during the outage."""
SLACK = 0.5
"""What a loaded two-core machine may add to a step (thread hand-offs, retries)."""


@contextlib.contextmanager
def background(call: Callable[[], object]) -> Iterator[concurrent.futures.Future[object]]:
    """Run ``call`` in a thread of its own for the block."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(call)


def at_risk_bound(ttl: float, slack: float) -> float:
    """Seconds from a grant by which a renewal left unanswered has turned the hold at_risk:
    one renewal interval, then ``min(ttl * SLOW_FRACTION, SLOW_MAX)``."""
    return ttl * RENEW_FRACTION + min(ttl * SLOW_FRACTION, SLOW_MAX) + slack


def holder_of(observer: lockd.Client, name: str) -> tuple[str, int, int] | None:
    """(owner, token, count) of the store's one holder of ``name``, or None."""
    holders = observer.inspect(name).holders
    assert len(holders) <= 1
    return None if not holders else (holders[0].owner, holders[0].token, holders[0].count)


def assert_live(lock: lockd.Lock, observer: lockd.Client) -> None:
    """``lock`` is held in the SDK and in the store, count 1, and stays so past a ttl."""
    assert lock.state is LockState.HELD, lock.state
    assert lock.count == 1
    assert holder_of(observer, lock.name) == (lock.owner, lock.token, 1)
    time.sleep(TTL * 1.3)  # renewed, not left to expire
    # A renewal that a loaded machine answers late reads at_risk for that while; the
    # store still holding the hold past its ttl is what shows it was renewed.
    assert lock.state in (LockState.HELD, LockState.AT_RISK), lock.state
    assert holder_of(observer, lock.name) == (lock.owner, lock.token, 1)


def lose_in_outage(outage: Outage, lock: lockd.Lock) -> None:
    """Cut the store for longer than ``lock``'s ttl, until the SDK has given the hold up."""
    outage.cut()
    time.sleep(OUTAGE)
    wait_until(lambda: lock.state is LockState.LOST, SLACK)
    outage.restore()


class Outage:
    """One store that a test can cut off from its client and restore."""

    def __init__(self, kind: str, url: str, direct_url: str) -> None:
        self.kind = kind
        self.url = url
        """What the client under test connects to."""
        self.direct_url = direct_url
        """The same store, never cut."""

    def cut(self, how: Cut = "refuse") -> None:
        """Cut the client off: ``refuse`` fails at once, ``blackhole`` hangs."""
        raise NotImplementedError

    def restore(self) -> None:
        """Reconnect the client to the store."""
        raise NotImplementedError


class SwitchOutage(Outage):
    """A memory or file store behind a switch."""

    def __init__(self, kind: str, url: str, direct_url: str, switch: Switch) -> None:
        super().__init__(kind, url, direct_url)
        self.switch = switch

    def cut(self, how: Cut = "refuse") -> None:
        self.switch.cut(how)

    def restore(self) -> None:
        self.switch.restore()


class ProxyOutage(Outage):
    """A network store (or every RedLock node) behind TCP proxies."""

    def __init__(self, kind: str, url: str, direct_url: str, proxies: list[Proxy]) -> None:
        super().__init__(kind, url, direct_url)
        self.proxies = proxies

    def cut(self, how: Cut = "refuse") -> None:
        for proxy in self.proxies:
            proxy.cut(how)

    def restore(self) -> None:
        for proxy in self.proxies:
            proxy.restore()

    def pause(self) -> None:
        """Hold every byte until :meth:`restore`."""
        for proxy in self.proxies:
            proxy.pause()


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
    """Poll ``check`` until true; returns the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


def restart_server(server: ServerProcess, timeout: float = 20.0) -> None:
    """Start a stopped ``lockd serve`` again with the same command (same port and store)."""
    if server.process.poll() is None:
        raise RuntimeError("stop the server before restarting it")
    if server.process.stdout:
        server.process.stdout.close()
    server.process = subprocess.Popen(
        server.process.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError("lockd serve did not restart")
