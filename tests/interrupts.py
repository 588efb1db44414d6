"""Test helpers that interrupt the caller: a real Ctrl-C, and a blocked I/O loop."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from lockd._runtime import runtime


@contextlib.contextmanager
def ctrl_c_after(seconds: float) -> Iterator[None]:
    """Send this (main) thread a real SIGINT after ``seconds``, unless the block ends first."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread().ident == main
    timer = threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextlib.contextmanager
def io_loop_blocked(seconds: float = 10.0) -> Iterator[None]:
    """Block lockd's whole I/O thread for the block (at most ``seconds``)."""
    release_loop = threading.Event()

    async def block_loop() -> None:
        release_loop.wait(seconds)

    blocked = runtime().submit(block_loop())
    try:
        yield
    finally:
        release_loop.set()
        blocked.result(5)
