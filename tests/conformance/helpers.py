"""Small tools the conformance tests share: stable snapshots, waiting, worker threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import lockd
from lockd.model import KeepaliveAnswer

T = TypeVar("T")

NS = "default"
"""The namespace Backend-level tests use (the clients' default)."""

WAKE_BOUND = 0.1
"""Seconds within which a freed waiter wakes (the median of several rounds): far below
the memory/file stores' fallback sweep (``SWEEP_INTERVAL``, 1 s), so that a waiter woken
by that sweep, or by any other polling, fails."""

SLACK = 0.5
"""Upper bound for one single wake-up that must merely be prompt: a shared machine's
disk can stall one durable write for a few hundred milliseconds. Promptness itself is
measured against :data:`WAKE_BOUND` over several rounds in ``test_waiting``."""


async def open_backend(url: str) -> lockd.Backend:
    """``lockd.connect(url)``, opened in the running loop (when the backend needs that)."""
    backend = lockd.connect(url)
    opener = getattr(backend, "open", None)
    if opener is not None:
        await opener()
    return backend


def snapshot(info: lockd.ResourceInfo) -> tuple[object, ...]:
    """The parts of an inspect answer that do not change by time passing alone."""
    return (
        info.namespace,
        info.name,
        info.limit,
        info.last_token,
        tuple((h.owner, h.token, h.count) for h in info.holders),
        tuple(w.owner for w in info.waiters),
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, what: str = "") -> None:
    """Poll ``predicate`` (a test-side check, not the SDK) until true or fail."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        time.sleep(0.002)


async def await_until(
    predicate: Callable[[], Awaitable[bool]], within: float = 2.0, what: str = ""
) -> None:
    """The async form of :func:`wait_until`."""
    deadline = time.monotonic() + within
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s: {what or predicate}")
        await asyncio.sleep(0.002)


def queued(client: lockd.Client, name: str, count: int) -> None:
    """Wait until ``name`` has ``count`` waiters."""
    wait_until(lambda: len(client.inspect(name).waiters) == count, what=f"{count} waiters")


async def aqueued(client: lockd.AsyncClient, name: str, count: int) -> None:
    """Wait until ``name`` has ``count`` waiters (async client)."""

    async def check() -> bool:
        return len((await client.inspect(name)).waiters) == count

    await await_until(check, what=f"{count} waiters on {name!r}")


async def bqueued(backend: lockd.Backend, name: str, count: int, namespace: str = NS) -> None:
    """Wait until ``name`` has ``count`` waiters (a backend)."""

    async def check() -> bool:
        return len((await backend.inspect(namespace, name)).waiters) == count

    await await_until(check, what=f"{count} waiters on {name!r}")


class Worker(threading.Thread, Generic[T]):
    """A thread running ``fn`` that keeps its result or error; ``outcome()`` re-raises it."""

    def __init__(self, fn: Callable[[], T], name: str = "conformance-worker") -> None:
        super().__init__(name=name, daemon=True)
        self._fn = fn
        self.result: T | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # handed to the test thread by outcome()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def outcome(self, timeout: float = 5.0) -> T | None:
        """Join, then return the result or raise the thread's error."""
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


def start(fn: Callable[[], T], name: str = "conformance-worker") -> Worker[T]:
    """Start a :class:`Worker`."""
    worker = Worker(fn, name)
    worker.start()
    return worker


def ttls(answers: list[KeepaliveAnswer | None]) -> list[float | None]:
    """The ttl of each session a keepalive answered (None: ended)."""
    return [None if answer is None else answer.ttl for answer in answers]
