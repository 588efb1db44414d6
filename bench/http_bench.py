"""HTTP benchmark of ``lockd serve``: throughput, latency and contention.

Starts its own ``lockd serve`` on a free loopback port for each ``--store`` and measures:

* throughput: ``--clients`` keep-alive connections (16) hammering (a) the bare route
  ``GET /healthz`` and (b) uncontended lock requests (each connection does acquire+release
  pairs on its own name; every HTTP request counts). Requests/s, p50/p99 latency, the
  CPU the server and the load generator used, and the ratio lock_rps / bare_rps.
* contention: ``--contenders`` (8) OS processes, each with the sync SDK
  (``lockd.Client(url)``, ``client.lock("hot", ttl=5, wait=30)``, ``with lock:``), doing
  a read-modify-write of a shared counter file under the lock. Critical sections/s, wait
  p50/p99, Jain's fairness index over per-process counts, lost updates, duplicate tokens.

The load generator shares the machine's cores with the server, so by default it is one
process running one uvloop event loop with hand-written HTTP/1.1 over ``asyncio.Protocol``
and the httptools C parser (``--client raw``): it spends a fraction of the CPU the server
spends per request, so the server, not the load generator, is what saturates. The httpx
clients (``httpx-async``: one ``httpx.AsyncClient`` per connection on one event loop;
``httpx-threads``: one ``httpx.Client`` per thread) are measured too, for comparison,
unless ``--no-compare``: on 2 cores they use a whole core themselves and reach about a
fifth of the raw client's rate while the server idles at a third of a core, so they
measure httpx, not the server.

The machine may be shared, so each main phase first waits (``--quiet-wait``) for a quiet
moment, and every phase records the CPU used by the server, by this load generator and by
everything else ("other"), plus the server's CPU per request, which moves less with noise
than requests/s do (``ratio_by_server_cpu``).

Usage::

    .venv/bin/python bench/http_bench.py                       # memory://
    .venv/bin/python bench/http_bench.py --store memory --store file-full
    .venv/bin/python bench/http_bench.py --store 'file://TMPDIR?sync=normal'

``TMPDIR`` in a store URL is replaced by a fresh temporary directory, removed at the end.
Aliases: ``memory`` (memory://), ``file-normal`` (file://TMPDIR?sync=normal),
``file-full`` (file://TMPDIR, which is sync=full). Results go to
``bench/results/http_bench.json`` and ``bench/results/http_bench.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools
import httpx
import uvloop

# bench/common.py (the folder of the script run is first on sys.path)
from common import (
    Json,
    Sample,
    cpu_model,
    fmt,
    git_state,
    jain_index,
    latency_summary,
    package_versions,
    run_contenders,
    shown_path,
    wait_for_quiet,
    write_reports,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
STORE_ALIASES = {
    "memory": "memory://",
    "file-normal": "file://TMPDIR?sync=normal",
    "file-full": "file://TMPDIR",
    "file": "file://TMPDIR",
}
ClientMode = Literal["raw", "httpx-async", "httpx-threads"]
CLIENT_MODES: tuple[ClientMode, ...] = ("raw", "httpx-async", "httpx-threads")
Workload = Literal["bare", "lock"]
JSON_HEADERS = {"content-type": "application/json"}
COUNTER_WIDTH = 20

AsyncCall = Callable[[str, str, bytes | None], Awaitable[tuple[int, bytes]]]
SyncCall = Callable[[str, str, bytes | None], tuple[int, bytes]]


# --- the server under test ------------------------------------------------------------------


@dataclass
class Server:
    """A ``lockd serve`` process started by this script (stopped by its pid only)."""

    process: subprocess.Popen[bytes]
    url: str
    store_url: str
    workdir: Path
    log_path: Path
    data_dir: Path | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def lockd_command() -> list[str]:
    """The ``lockd`` entry point of the interpreter running this script."""
    script = Path(sys.executable).with_name("lockd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lockd.cli"]


def resolve_store(spec: str, tmp_base: str | None) -> tuple[str, Path | None]:
    """Expand an alias and ``TMPDIR``; returns (store URL, temp data dir or None)."""
    url = STORE_ALIASES.get(spec, spec)
    if "TMPDIR" not in url:
        return url, None
    data_dir = Path(tempfile.mkdtemp(prefix="lockd-bench-data-", dir=tmp_base))
    return url.replace("TMPDIR", str(data_dir)), data_dir


def start_server(spec: str, tmp_base: str | None, timeout: float = 20.0) -> Server:
    """Start ``lockd serve`` on a free loopback port and wait until it is ready."""
    store_url, data_dir = resolve_store(spec, tmp_base)
    workdir = Path(tempfile.mkdtemp(prefix="lockd-bench-"))
    log_path = workdir / "server.log"
    for _attempt in range(3):
        port = free_port()
        command = [
            *lockd_command(),
            "serve",
            "--store",
            store_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        with log_path.open("ab") as log:
            process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=log)
        server = Server(process, f"http://127.0.0.1:{port}", store_url, workdir, log_path, data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                    return server
            time.sleep(0.05)
        if process.poll() is None:
            stop_server(server, cleanup=False)
            break
        if "address already in use" not in server.log_tail().lower():
            break
    tail = server.log_tail()
    cleanup_server(server)
    raise RuntimeError(f"lockd serve --store {store_url} did not start:\n{tail}")


def stop_server(server: Server, timeout: float = 10.0, cleanup: bool = True) -> int:
    """SIGTERM the server, wait, SIGKILL it on timeout; remove its temp dirs."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if cleanup:
        cleanup_server(server)
    return process.returncode


def cleanup_server(server: Server) -> None:
    """Remove the server's working and data directories."""
    shutil.rmtree(server.workdir, ignore_errors=True)
    if server.data_dir is not None:
        shutil.rmtree(server.data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_server(spec: str, tmp_base: str | None) -> Iterator[Server]:
    """A server for the duration of a ``with`` block."""
    server = start_server(spec, tmp_base)
    try:
        yield server
    except BaseException:
        print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        code = stop_server(server)
        if code not in (0, -signal.SIGTERM):
            print(f"  (server exited with {code})", file=sys.stderr)


# --- statistics -----------------------------------------------------------------------------


@dataclass
class Recorder:
    """One worker's completed requests inside the measuring window [start, end)."""

    start: float
    end: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, t0: float, t1: float, ok: bool) -> bool:
        """Record a request that completed at ``t1``; False once the window has ended."""
        if t1 >= self.end:
            return False
        if t1 >= self.start:
            if ok:
                self.latencies.setdefault(op, []).append(t1 - t0)
            else:
                self.errors[op] = self.errors.get(op, 0) + 1
        return True


def phase_result(
    workload: Workload, mode: ClientMode, recorders: list[Recorder], first: Sample, last: Sample
) -> Json:
    """Requests/s, latency and CPU of one throughput phase."""
    duration = recorders[0].end - recorders[0].start
    per_op: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for rec in recorders:
        for op, values in rec.latencies.items():
            per_op.setdefault(op, []).extend(values)
        for op, count in rec.errors.items():
            errors[op] = errors.get(op, 0) + count
    every = [v for values in per_op.values() for v in values]
    wall = last.wall - first.wall
    served = sum(errors.values()) + len(every)
    # Requests completed in the CPU sampling window (about the measuring window).
    server_cpu = last.target_cpu - first.target_cpu
    result: Json = {
        "workload": workload,
        "client": mode,
        "connections": len(recorders),
        "duration_s": round(duration, 3),
        "requests": len(every),
        "rps": round(len(every) / duration, 1),
        "errors": errors,
        "latency": latency_summary(every),
        "server_cpu_cores": round(server_cpu / wall, 3),
        "server_cpu_us_per_request": round(server_cpu / served * 1e6, 1) if served else None,
        "loadgen_cpu_cores": round((last.own_cpu - first.own_cpu) / wall, 3),
        "loadgen_cpu_us_per_request": (
            round((last.own_cpu - first.own_cpu) / served * 1e6, 1) if served else None
        ),
        "other_cpu_cores": round(last.others(first), 3),
    }
    if workload == "lock":
        result["pairs_per_s"] = round(len(per_op.get("release", [])) / duration, 1)
        result["per_op"] = {op: latency_summary(values) for op, values in sorted(per_op.items())}
    return result


# --- request bodies -------------------------------------------------------------------------


def acquire_body(owner: str, ttl: float, request_ids: bool) -> bytes:
    """What the SDK sends to acquire without waiting (a fresh request id per call)."""
    body: Json = {"owner": owner, "ttl": ttl, "wait": 0.0, "limit": 1}
    if request_ids:
        body["request_id"] = uuid.uuid4().hex
    return json.dumps(body).encode()


def release_body(owner: str, token: int, request_ids: bool) -> bytes:
    """What the SDK sends to release a hold it knows the token of."""
    body: Json = {"owner": owner, "token": token}
    if request_ids:
        body["request_id"] = uuid.uuid4().hex
    return json.dumps(body).encode()


@dataclass(frozen=True)
class LockJob:
    """What one lock worker does: acquire+release pairs on its own name."""

    name: str
    owner: str
    ttl: float
    request_ids: bool

    @classmethod
    def for_worker(cls, index: int, ttl: float, request_ids: bool) -> LockJob:
        run = uuid.uuid4().hex[:6]
        return cls(f"bench-{run}-{index}", f"bench-worker-{run}-{index}", ttl, request_ids)

    @property
    def acquire_path(self) -> str:
        return f"/v1/locks/{self.name}/acquire"

    @property
    def release_path(self) -> str:
        return f"/v1/locks/{self.name}/release"


# --- the raw client: HTTP/1.1 over asyncio.Protocol + httptools -----------------------------


class RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request in flight at a time."""

    def __init__(self, host_header: str) -> None:
        self._host = host_header
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        body, self._body = b"".join(self._body), []
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), body))

    async def call(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """Send one request and wait for its response."""
        assert self._transport is not None
        assert self._waiter is None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        waiter: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._waiter = waiter
        self._transport.write(head.encode() + b"\r\n" + (body or b""))
        return await waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# --- workers --------------------------------------------------------------------------------


async def bare_worker(call: AsyncCall, rec: Recorder) -> None:
    """GET /healthz until the window ends."""
    clock = time.perf_counter
    while True:
        t0 = clock()
        status, _ = await call("GET", "/healthz", None)
        if not rec.add("healthz", t0, clock(), status == 200):
            return


async def lock_worker(call: AsyncCall, rec: Recorder, job: LockJob) -> None:
    """Acquire+release pairs on the worker's own name until the window ends."""
    clock = time.perf_counter
    more = True
    while more:
        t0 = clock()
        status, body = await call(
            "POST", job.acquire_path, acquire_body(job.owner, job.ttl, job.request_ids)
        )
        more = rec.add("acquire", t0, clock(), status == 200)
        if status != 200:
            continue
        token = int(json.loads(body)["token"])
        t0 = clock()
        status, _ = await call(
            "POST", job.release_path, release_body(job.owner, token, job.request_ids)
        )
        more = rec.add("release", t0, clock(), status == 200) and more


def bare_worker_sync(call: SyncCall, rec: Recorder) -> None:
    """The threaded twin of :func:`bare_worker`."""
    clock = time.perf_counter
    while True:
        t0 = clock()
        status, _ = call("GET", "/healthz", None)
        if not rec.add("healthz", t0, clock(), status == 200):
            return


def lock_worker_sync(call: SyncCall, rec: Recorder, job: LockJob) -> None:
    """The threaded twin of :func:`lock_worker`."""
    clock = time.perf_counter
    more = True
    while more:
        t0 = clock()
        status, body = call(
            "POST", job.acquire_path, acquire_body(job.owner, job.ttl, job.request_ids)
        )
        more = rec.add("acquire", t0, clock(), status == 200)
        if status != 200:
            continue
        token = int(json.loads(body)["token"])
        t0 = clock()
        status, _ = call("POST", job.release_path, release_body(job.owner, token, job.request_ids))
        more = rec.add("release", t0, clock(), status == 200) and more


# --- throughput phases ----------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseSpec:
    """One throughput measurement."""

    url: str
    server_pid: int
    workload: Workload
    mode: ClientMode
    clients: int
    warmup: float
    duration: float
    request_ids: bool

    def job(self, index: int) -> LockJob:
        return LockJob.for_worker(index, ttl=30.0, request_ids=self.request_ids)


def httpx_async_call(client: httpx.AsyncClient) -> AsyncCall:
    async def call(method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = JSON_HEADERS if body is not None else None
        response = await client.request(method, path, content=body, headers=headers)
        return response.status_code, response.content

    return call


def httpx_sync_call(client: httpx.Client) -> SyncCall:
    def call(method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = JSON_HEADERS if body is not None else None
        response = client.request(method, path, content=body, headers=headers)
        return response.status_code, response.content

    return call


async def _throughput_async(spec: PhaseSpec) -> Json:
    parts = urlsplit(spec.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    calls: list[AsyncCall] = []
    closers: list[Callable[[], Awaitable[None]]] = []
    for _ in range(spec.clients):
        if spec.mode == "raw":
            conn = await RawConnection.open(host, port)
            calls.append(conn.call)
            closers.append(_async_noop(conn.close))
        else:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            client = httpx.AsyncClient(base_url=spec.url, limits=limits, timeout=30.0)
            calls.append(httpx_async_call(client))
            closers.append(client.aclose)
    start = time.perf_counter() + spec.warmup
    recorders = [Recorder(start, start + spec.duration) for _ in range(spec.clients)]
    if spec.workload == "bare":
        workers = [bare_worker(c, r) for c, r in zip(calls, recorders, strict=True)]
    else:
        workers = [
            lock_worker(c, r, spec.job(i))
            for i, (c, r) in enumerate(zip(calls, recorders, strict=True))
        ]
    tasks = [asyncio.ensure_future(w) for w in workers]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    first = Sample.take([spec.server_pid])
    await asyncio.sleep(max(0.0, start + spec.duration - time.perf_counter()))
    last = Sample.take([spec.server_pid])
    try:
        await asyncio.gather(*tasks)
    finally:
        for close in closers:
            await close()
    return phase_result(spec.workload, spec.mode, recorders, first, last)


def _async_noop(func: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        func()

    return run


def _throughput_threads(spec: PhaseSpec) -> Json:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [
        httpx.Client(base_url=spec.url, limits=limits, timeout=30.0) for _ in range(spec.clients)
    ]
    start = time.perf_counter() + spec.warmup
    recorders = [Recorder(start, start + spec.duration) for _ in range(spec.clients)]
    threads: list[threading.Thread] = []
    for i, (client, rec) in enumerate(zip(clients, recorders, strict=True)):
        call = httpx_sync_call(client)
        if spec.workload == "bare":
            thread = threading.Thread(target=bare_worker_sync, args=(call, rec), daemon=True)
        else:
            thread = threading.Thread(
                target=lock_worker_sync, args=(call, rec, spec.job(i)), daemon=True
            )
        threads.append(thread)
        thread.start()
    time.sleep(max(0.0, start - time.perf_counter()))
    first = Sample.take([spec.server_pid])
    time.sleep(max(0.0, start + spec.duration - time.perf_counter()))
    last = Sample.take([spec.server_pid])
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    return phase_result(spec.workload, spec.mode, recorders, first, last)


def run_throughput(spec: PhaseSpec) -> Json:
    """Measure one workload with one client mode."""
    if spec.mode == "httpx-threads":
        return _throughput_threads(spec)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_throughput_async(spec))


# --- contention -----------------------------------------------------------------------------


def contender(
    index: int,
    url: str,
    counter_path: str,
    duration: float,
    ttl: float,
    wait: float,
    barrier: Barrier,
    results: mp.Queue[Json],
) -> None:
    """One contending process: critical sections on "hot" with the sync SDK until time's up."""
    import lockd  # in the child only: the parent never opens the SDK's I/O thread

    out: Json = {
        "index": index,
        "count": 0,
        "waits": [],
        "tokens": [],
        "errors": [],
        "started": 0.0,
        "finished": 0.0,
        "cpu_s": 0.0,
    }
    waits: list[float] = out["waits"]
    tokens: list[int | None] = out["tokens"]
    fd = os.open(counter_path, os.O_RDWR)
    try:
        client = lockd.Client(url)
        lock = client.lock("hot", ttl=ttl, wait=wait)
        barrier.wait(timeout=60)
        out["started"] = time.monotonic()
        cpu0 = time.process_time()
        end = out["started"] + duration
        while time.monotonic() < end:
            t0 = time.perf_counter()
            with lock:
                waits.append(time.perf_counter() - t0)
                tokens.append(lock.token)
                value = int(os.pread(fd, COUNTER_WIDTH, 0))  # read-modify-write, unprotected
                os.pwrite(fd, b"%0*d" % (COUNTER_WIDTH, value + 1), 0)  # but by the lock
            out["count"] += 1
        out["finished"] = time.monotonic()
        out["cpu_s"] = time.process_time() - cpu0
        client.close()
    except Exception as exc:
        out["errors"].append(repr(exc))
        out["finished"] = out["finished"] or time.monotonic()
        with contextlib.suppress(Exception):
            barrier.abort()
    finally:
        os.close(fd)
        results.put(out)


def run_contention(
    url: str, server_pid: int, processes: int, duration: float, ttl: float, wait: float
) -> Json:
    """Critical sections/s, waits, fairness and lost updates of processes sharing "hot"."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="lockd-bench-counter-") as tmp:
        counter = Path(tmp) / "counter"
        counter.write_bytes(b"%0*d" % (COUNTER_WIDTH, 0))
        barrier = ctx.Barrier(processes + 1)
        queue: mp.Queue[Json] = ctx.Queue()
        procs = [
            ctx.Process(
                target=contender,
                args=(i, url, str(counter), duration, ttl, wait, barrier, queue),
                daemon=True,
            )
            for i in range(processes)
        ]
        outs, first, last = run_contenders(
            procs, barrier, queue, [server_pid], 60, duration + wait + 60
        )
        final = int(counter.read_bytes()[:COUNTER_WIDTH])
    leftover = httpx.get(f"{url}/v1/locks/hot", timeout=5).json()
    return contention_result(outs, final, first, last, leftover, ttl, wait)


def contention_result(
    outs: list[Json],
    final: int,
    first: Sample,
    last: Sample,
    leftover: Json,
    ttl: float,
    wait: float,
) -> Json:
    """Summarise the contenders' reports."""
    outs.sort(key=lambda o: o["index"])
    counts = [int(o["count"]) for o in outs]
    waits = [w for o in outs for w in o["waits"]]
    tokens = [t for o in outs for t in o["tokens"]]
    total = sum(counts)
    started = min((o["started"] for o in outs if o["started"]), default=0.0)
    elapsed = max((o["finished"] for o in outs), default=0.0) - started
    wall = last.wall - first.wall
    return {
        "processes": len(outs),
        "lock": {"name": "hot", "ttl": ttl, "wait": wait},
        "elapsed_s": round(elapsed, 3),
        "critical_sections": total,
        "cs_per_s": round(total / elapsed, 1) if elapsed > 0 else None,
        "per_process_counts": counts,
        "wait": latency_summary(waits),
        "jain_fairness": jain_index(counts),
        "counter_final": final,
        "lost_updates": total - final,
        "duplicate_tokens": len(tokens) - len(set(tokens)),
        "tokens_monotonic_per_process": all(
            all(a < b for a, b in zip(o["tokens"], o["tokens"][1:], strict=False)) for o in outs
        ),
        "leftover_holders": len(leftover.get("holders", [])),
        "leftover_waiters": len(leftover.get("waiters", [])),
        "errors": [e for o in outs for e in o["errors"]],
        "server_cpu_cores": round((last.target_cpu - first.target_cpu) / wall, 3),
        "contenders_cpu_cores": round(sum(o["cpu_s"] for o in outs) / wall, 3),
        "server_cpu_us_per_cs": (
            round((last.target_cpu - first.target_cpu) / total * 1e6, 1) if total else None
        ),
        "contenders_cpu_us_per_cs": (
            round(sum(o["cpu_s"] for o in outs) / total * 1e6, 1) if total else None
        ),
        "machine_busy_cores": round((last.machine_cpu - first.machine_cpu) / wall, 3),
    }


# --- machine info and reports ---------------------------------------------------------------


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path``."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            if len(parts) > 2 and str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def machine_info() -> Json:
    """Cores, Python, CPU model, memory and the versions of the server stack."""
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    stack = ("lockd", "fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools", "httpx")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": package_versions(stack),
        **git_state(),
        "loadavg_at_start": os.getloadavg(),
    }


def markdown_report(report: Json) -> str:
    """A short human-readable summary of the JSON report."""
    m = report["machine"]
    cfg = report["config"]
    dirty = " (+ uncommitted src/ changes)" if m.get("src_uncommitted_changes") else ""
    lines = [
        "# lockd HTTP benchmark",
        "",
        f"{report['date']} · {m['nproc']} cores ({m['cpu_model']}) · Python {m['python']} · "
        f"commit {m['git_commit']}{dirty} · load generator `{cfg['client']}`, "
        f"{cfg['clients']} keep-alive connections, {cfg['warmup_s']} s warm-up + "
        f"{cfg['duration_s']} s measured; request ids {'on' if cfg['request_ids'] else 'off'}",
        "",
        "## Throughput (16 keep-alive connections)",
        "",
        "| store | route | req/s | p50 ms | p99 ms | server CPU | server µs/req "
        "| loadgen CPU | other CPU | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in report["runs"]:
        for key in ("bare", "lock"):
            ph = run["throughput"][key]
            route = "GET /healthz" if key == "bare" else "acquire+release"
            lines.append(
                f"| {run['store']} | {route} | {fmt(ph['rps'])}"
                f" | {fmt(ph['latency']['p50_ms'], 2)}"
                f" | {fmt(ph['latency']['p99_ms'], 2)} | {fmt(ph['server_cpu_cores'], 2)}"
                f" | {fmt(ph['server_cpu_us_per_request'])}"
                f" | {fmt(ph['loadgen_cpu_cores'], 2)} | {fmt(ph['other_cpu_cores'], 2)}"
                f" | {sum(ph['errors'].values())} |"
            )
    lines += [
        "",
        "| store | lock_rps / bare_rps | same, from server CPU per request | goal |",
        "| --- | ---: | ---: | --- |",
    ]
    for run in report["runs"]:
        ratio = run["ratio_lock_to_bare"]
        verdict = "met" if ratio >= cfg["ratio_goal"] else "missed"
        lines.append(
            f"| {run['store']} | {ratio:.3f} | {fmt(run['ratio_by_server_cpu'], 3)} "
            f"| >= {cfg['ratio_goal']} ({verdict}) |"
        )
    lines += [
        "",
        f"## Contention ({cfg['contenders']} processes, sync SDK, one lock)",
        "",
        "| store | CS/s | wait p50 ms | wait p99 ms | Jain | lost updates | dup tokens "
        "| server µs/CS | contenders µs/CS | per-process counts |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in report["runs"]:
        c = run.get("contention")
        if c is None:
            continue
        lines.append(
            f"| {run['store']} | {fmt(c['cs_per_s'])} | {fmt(c['wait']['p50_ms'], 2)} | "
            f"{fmt(c['wait']['p99_ms'], 2)} | {fmt(c['jain_fairness'], 4)} | "
            f"{c['lost_updates']} | {c['duplicate_tokens']} | "
            f"{fmt(c['server_cpu_us_per_cs'])} | {fmt(c['contenders_cpu_us_per_cs'])} | "
            f"{', '.join(str(x) for x in c['per_process_counts'])} |"
        )
    if report.get("client_comparison"):
        comp = report["client_comparison"]
        lines += [
            "",
            f"## Load generators compared ({comp['store']})",
            "",
            "| client | route | req/s | p50 ms | p99 ms | server CPU | loadgen CPU | other CPU |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for ph in comp["phases"]:
            lines.append(
                f"| {ph['client']} | {ph['workload']} | {fmt(ph['rps'])} | "
                f"{fmt(ph['latency']['p50_ms'], 2)} | {fmt(ph['latency']['p99_ms'], 2)} | "
                f"{fmt(ph['server_cpu_cores'], 2)} | {fmt(ph['loadgen_cpu_cores'], 2)} | "
                f"{fmt(ph['other_cpu_cores'], 2)} |"
            )
    lines += [
        "",
        "CPU columns: cores used during the measured window (1.00 = one core busy); "
        "'other' is every other process on the machine (noise).",
        "",
    ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--store",
        action="append",
        metavar="URL",
        help="store URL or alias (memory, file-normal, file-full); repeatable; default memory://",
    )
    parser.add_argument(
        "--client",
        choices=CLIENT_MODES,
        default="raw",
        help="load generator for the throughput phases (default raw)",
    )
    parser.add_argument("--clients", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--contenders", type=int, default=8, help="contending processes")
    parser.add_argument("--contention-duration", type=float, default=5.0)
    parser.add_argument(
        "--no-request-id",
        dest="request_ids",
        action="store_false",
        help="omit request ids (the SDK always sends them)",
    )
    parser.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip measuring the other load generators on the first store",
    )
    parser.add_argument("--no-contention", dest="contention", action="store_false")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=4.0,
        help="before each main phase, wait up to this many seconds for the machine to be quiet",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="cores other processes may use for the machine to count as quiet",
    )
    parser.add_argument("--tmp-base", help="parent directory for TMPDIR (default: system temp)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="output directory")
    parser.add_argument("--ratio-goal", type=float, default=0.7)
    return parser.parse_args(argv)


def cpu_ratio(bare: Json, lock: Json) -> float | None:
    """The ratio a CPU-bound server would reach: bare CPU/request over lock CPU/request.

    Unlike the req/s ratio it does not move with what else the machine is running.
    """
    b, lk = bare["server_cpu_us_per_request"], lock["server_cpu_us_per_request"]
    return round(b / lk, 4) if b and lk else None


def measure_store(spec: str, args: argparse.Namespace, compare: bool) -> tuple[Json, Json | None]:
    """Every phase against one freshly started server."""
    with running_server(spec, args.tmp_base) as server:
        print(f"store {server.store_url} (pid {server.pid}, {server.url})", flush=True)

        def phase(workload: Workload, mode: ClientMode, settle: bool = True) -> Json:
            quiet = wait_for_quiet(args.quiet_threshold, args.quiet_wait if settle else 0.0)
            result = run_throughput(
                PhaseSpec(
                    server.url,
                    server.pid,
                    workload,
                    mode,
                    args.clients,
                    args.warmup,
                    args.duration,
                    args.request_ids,
                )
            )
            result["quiet_wait"] = quiet
            print(
                f"  {mode:13} {workload:4}  {result['rps']:>9,.1f} req/s  "
                f"p50 {result['latency']['p50_ms']} ms  p99 {result['latency']['p99_ms']} ms  "
                f"server {result['server_cpu_cores']:.2f} cores  "
                f"loadgen {result['loadgen_cpu_cores']:.2f}  "
                f"others {result['other_cpu_cores']:.2f}",
                flush=True,
            )
            return result

        bare, lock = phase("bare", args.client), phase("lock", args.client)
        run: Json = {
            "store": spec,
            "store_url": server.store_url,
            "data_fs": fs_type(server.data_dir) if server.data_dir else None,
            "throughput": {"bare": bare, "lock": lock},
            "ratio_lock_to_bare": round(lock["rps"] / bare["rps"], 4) if bare["rps"] else 0.0,
            "ratio_by_server_cpu": cpu_ratio(bare, lock),
        }
        run["ratio_goal_met"] = run["ratio_lock_to_bare"] >= args.ratio_goal
        print(
            f"  ratio lock/bare {run['ratio_lock_to_bare']:.3f} (req/s), "
            f"{run['ratio_by_server_cpu']} (server CPU per request)",
            flush=True,
        )
        if args.contention:
            quiet = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            c = run_contention(
                server.url,
                server.pid,
                args.contenders,
                args.contention_duration,
                ttl=5.0,
                wait=30.0,
            )
            c["quiet_wait"] = quiet
            run["contention"] = c
            print(
                f"  contention {c['cs_per_s']} CS/s  wait p50 {c['wait']['p50_ms']} ms  "
                f"p99 {c['wait']['p99_ms']} ms  Jain {c['jain_fairness']}  "
                f"lost {c['lost_updates']}  counts {c['per_process_counts']}",
                flush=True,
            )
        comparison = None
        if compare:
            others = [m for m in CLIENT_MODES if m != args.client]
            phases = [run["throughput"]["bare"], run["throughput"]["lock"]]
            for mode in others:
                phases += [phase("bare", mode, settle=False), phase("lock", mode, settle=False)]
            comparison = {"store": spec, "phases": phases}
        return run, comparison


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores: list[str] = args.store or ["memory://"]
    began = time.monotonic()
    report: Json = {
        "benchmark": "lockd HTTP",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "client": args.client,
            "clients": args.clients,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "contenders": args.contenders,
            "contention_duration_s": args.contention_duration,
            "request_ids": args.request_ids,
            "ratio_goal": args.ratio_goal,
            "stores": stores,
        },
        "runs": [],
    }
    for i, spec in enumerate(stores):
        run, comparison = measure_store(spec, args, compare=args.compare and i == 0)
        report["runs"].append(run)
        if comparison is not None:
            report["client_comparison"] = comparison
    report["total_seconds"] = round(time.monotonic() - began, 1)
    if not args.contention:
        for run in report["runs"]:
            run["contention"] = None
    json_path, md_path = write_reports(report, markdown_report(report), args.results, "http_bench")
    print(f"wrote {shown_path(json_path)} and {md_path.name} in {report['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
