"""Start and stop real ``lockd serve`` processes for tests (by the PID we started)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A running ``lockd serve``."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server and wait for it; kill it if it does not stop in time."""
        return stop_process(self.process, sig, timeout)


def stop_process(process: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Signal a process we started (by its PID), wait, kill it if it does not stop."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def start_server(
    store: str,
    cwd: str | None = None,
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``lockd serve --store STORE`` on a free port and wait until it answers.

    ``env`` adds environment variables (server settings such as ``LOCKD_MAX_POLL``).
    The port is free when chosen but may be taken before the server binds it: then the
    server exits at once, and another port is tried.
    """
    for attempt in range(3):
        try:
            return _start_server(store, cwd, timeout, env)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_server(
    store: str, cwd: str | None, timeout: float, env: dict[str, str] | None
) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "lockd.cli", "serve", "--store", store, "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})  # fmt: skip
    server = ServerProcess(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            if process.stdout:
                process.stdout.close()
            raise RuntimeError(f"lockd serve exited with {process.returncode}: {out}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError("lockd serve did not start in time")


@contextlib.contextmanager
def running_server(
    store: str, cwd: str | None = None, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A server for the duration of a ``with`` block."""
    server = start_server(store, cwd, env=env)
    try:
        yield server
    finally:
        server.stop()
        if server.process.stdout:
            server.process.stdout.close()


__all__ = ["ServerProcess", "free_port", "running_server", "start_server", "stop_process"]
