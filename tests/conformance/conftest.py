"""Fixtures of the conformance suite, on top of ``tests/conftest.py``.

``backend`` is the Backend protocol itself, opened with ``lockd.connect`` in the test's
event loop. A ``file://`` store is open in one place per process, so a test uses either
``backend`` or the clients of ``tests/conftest.py``, never both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

import lockd
from tests.conformance.helpers import open_backend

IO_THREAD = "lockd-io"
"""The SDK's own I/O thread: started once per process, on purpose long-lived."""


@pytest.fixture
async def backend(store_url: str) -> AsyncIterator[lockd.Backend]:
    """A fresh backend on each kind of store, bound to the test's event loop."""
    b = await open_backend(store_url)
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (callback threads get a moment to end)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    new = [t for t in threading.enumerate() if t not in before and t.name != IO_THREAD]
    for thread in new:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in new if t.is_alive()]
    assert not left, f"threads still running after the test: {left}"
