"""Start and stop real ``redis-server`` processes for tests (by the PID we started).

Each server listens on a free loopback port, keeps its files in its own temporary
folder, persists nothing unless asked (``--save '' --appendonly no``) and is stopped
by the PID this module started: SIGTERM, then SIGKILL if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.serverproc import free_port, stop_process


def redis_server_binary() -> str | None:
    """The ``redis-server`` on PATH, or None."""
    return shutil.which("redis-server")


def _ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on ``port`` answers PING (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait_until_up(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _ping(port):
            return True
        time.sleep(0.02)
    return False


@dataclass
class RedisProcess:
    """A running ``redis-server`` we started."""

    process: subprocess.Popen[bytes]
    port: int
    folder: Path
    command: list[str]

    @property
    def url(self) -> str:
        """Its ``redis://`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal our server and wait for it; kill it if it does not stop in time."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)  # a paused server cannot exit
        code = stop_process(self.process, sig, timeout)
        if self.process.stdout:
            self.process.stdout.close()
        return code

    def kill(self) -> None:
        """kill -9 the server (a crash); :meth:`restart` brings it back."""
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its connections but answers nothing."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        """Start the server again on the same port, folder and options (after a stop)."""
        if self.process.poll() is None:
            raise RuntimeError("stop the server before restarting it")
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        if not _wait_until_up(self.process, self.port, timeout):
            out = self.process.stdout.read() if self.process.stdout else b""
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"redis-server did not restart: {out.decode(errors='replace')}")


def start_redis(*extra: str, timeout: float = 10.0) -> RedisProcess:
    """Start ``redis-server`` on a free loopback port in a new temporary folder."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    folder = Path(tempfile.mkdtemp(prefix="lockd-redis-"))
    for _ in range(5):  # another process may take the free port before redis binds it
        port = free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                   "--save", "", "--appendonly", "no", "--daemonize", "no", *extra]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server = RedisProcess(process, port, folder, command)
        if _wait_until_up(process, port, timeout):
            return server
        out = b""
        if process.poll() is not None and process.stdout:
            out = process.stdout.read()
        server.stop(signal.SIGKILL)
        if b"Address already in use" not in out:
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"redis-server did not start: {out.decode(errors='replace')}")
    shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError("redis-server found no free port")


@contextlib.contextmanager
def running_redis(*extra: str) -> Iterator[RedisProcess]:
    """A redis-server for the duration of a ``with`` block; its folder is removed after."""
    server = start_redis(*extra)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


__all__ = ["RedisProcess", "redis_server_binary", "running_redis", "start_redis"]
