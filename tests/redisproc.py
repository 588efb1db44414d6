"""Start and stop real ``redis-server`` processes for tests (by the PID we started).

Each server listens on a free loopback port, keeps its files in its own temporary
folder, persists nothing unless asked (``--save '' --appendonly no``) and is stopped
by the PID this module started: SIGTERM, then SIGKILL if it does not exit in time.

A server started with ``tls=`` (see :func:`make_tls_files`, which runs the ``openssl``
command line) listens for TLS only. Readiness is any RESP answer to PING, so servers
that want a password (``-NOAUTH``) count as up too.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
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


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate it signed (for 127.0.0.1 and localhost)."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self, port: int) -> list[str]:
        """redis-server options to listen for TLS only, on ``port``."""
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "no"]  # fmt: skip


def make_tls_files(folder: Path) -> TlsFiles:
    """Generate a CA and a server certificate into ``folder`` with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is not installed")
    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    ca_key, csr, ext = folder / "ca.key", folder / "server.csr", folder / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=lockd test CA", "-keyout", str(ca_key), "-out", str(files.ca)],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", str(files.key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(files.cert)],
    ]  # fmt: skip
    for step in steps:
        subprocess.run([openssl, *step], check=True, capture_output=True, timeout=60)
    return files


def _ping(port: int, timeout: float = 0.5, tls: TlsFiles | None = None) -> bool:
    """True when a Redis on ``port`` answers PING at all (raw RESP, no client library).

    ``+PONG`` and an error such as ``-NOAUTH`` both show the server is serving.
    """
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout))
            if tls is not None:
                context = ssl.create_default_context(cafile=str(tls.ca))
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname="127.0.0.1"))
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH", b"-NOPERM"))
    except OSError:  # ssl.SSLError is an OSError too
        return False


def _wait_until_up(
    process: subprocess.Popen[bytes], port: int, timeout: float, tls: TlsFiles | None = None
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _ping(port, tls=tls):
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
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        """Its ``redis://`` URL (``rediss://`` trusting the test CA when it speaks TLS)."""
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"

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
        if not _wait_until_up(self.process, self.port, timeout, self.tls):
            out = self.process.stdout.read() if self.process.stdout else b""
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"redis-server did not restart: {out.decode(errors='replace')}")


def start_redis(*extra: str, timeout: float = 10.0, tls: TlsFiles | None = None) -> RedisProcess:
    """Start ``redis-server`` on a free loopback port in a new temporary folder.

    With ``tls``, the port is a TLS port and the plain port is off.
    """
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    folder = Path(tempfile.mkdtemp(prefix="lockd-redis-"))
    for _ in range(5):  # another process may take the free port before redis binds it
        port = free_port()
        ports = ["--port", str(port)] if tls is None else tls.server_args(port)
        command = [binary, *ports, "--bind", "127.0.0.1", "--dir", str(folder),
                   "--save", "", "--appendonly", "no", "--daemonize", "no", *extra]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server = RedisProcess(process, port, folder, command, tls)
        if _wait_until_up(process, port, timeout, tls):
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
def running_redis(*extra: str, tls: TlsFiles | None = None) -> Iterator[RedisProcess]:
    """A redis-server for the duration of a ``with`` block; its folder is removed after."""
    server = start_redis(*extra, tls=tls)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@contextlib.contextmanager
def running_redis_nodes(count: int, *extra: str) -> Iterator[list[RedisProcess]]:
    """``count`` independent redis-servers (RedLock nodes), all stopped and removed after."""
    servers: list[RedisProcess] = []
    try:
        for _ in range(count):
            servers.append(start_redis(*extra))
        yield servers
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)


@contextlib.contextmanager
def running_redis_cluster(masters: int = 3) -> Iterator[list[RedisProcess]]:
    """A Redis Cluster of ``masters`` real redis-servers (no replicas), slots spread over
    them; stopped and removed after."""
    servers: list[RedisProcess] = []
    try:
        for _ in range(masters):
            servers.append(_start_cluster_node())
        hosts = [f"127.0.0.1:{server.port}" for server in servers]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *hosts, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(server.port) for server in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ready")
            time.sleep(0.05)
        yield servers
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)


def _start_cluster_node(attempts: int = 3) -> RedisProcess:
    """One cluster-enabled redis-server. Its bus port (by default port + 10000, which a
    free port may not allow) is another free port, picked again if it was taken."""

    def start() -> RedisProcess:
        return start_redis("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-port", str(free_port()))  # fmt: skip

    for _ in range(attempts - 1):
        with contextlib.suppress(RuntimeError):
            return start()
    return start()


def _cluster_ok(port: int) -> bool:
    info = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "info"],
        check=False,
        capture_output=True,
        timeout=5,
    )
    return b"cluster_state:ok" in info.stdout


__all__ = [
    "RedisProcess",
    "TlsFiles",
    "make_tls_files",
    "redis_server_binary",
    "running_redis",
    "running_redis_cluster",
    "running_redis_nodes",
    "start_redis",
]
