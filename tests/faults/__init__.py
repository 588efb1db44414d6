"""Fault tests: stores cut off, paused or killed under a client that holds locks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from tests.faults.proxy import Proxy, Switch

Cut = Literal["refuse", "blackhole"]


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
