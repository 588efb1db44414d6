"""Many holds from one client, many waiters on one name: the figures the session design
is measured by (renewal traffic per client, server memory per hold, FIFO handoff).

Each phase runs against its own ``lockd serve`` (``running_server`` of http_bench.py: a
free loopback port, ``TMPDIR`` store aliases), for each ``--store``:

* ``holds``, for each N in ``--holds``: one spawned client process (sync SDK,
  ``lockd.Client(url)``) acquires N distinct names one after another (``acquire(wait=0)``,
  ``--ttl``, renewal on), stopping at ``--cap`` seconds ("did not finish", with the count
  held), then holds them for ``--window`` s. Reported: time to acquire and holds/s;
  renewal (extend) requests/s answered during the window against the N * 3 / ttl the SDK
  should send (one per hold every ttl/3), and those left unanswered; the holds held /
  at_risk / lost after the window; CPU of the client process (all threads, so the SDK's
  I/O thread) and of the server during the window; the server's ``VmRSS`` before and
  after acquiring. The server has no request counter, and a counting proxy would add a
  hop and CPU on a 2-core machine, so requests are counted in the client by wrapping
  httpx's ``AsyncHTTPTransport.handle_async_request``, which every request of the
  ``http://`` backend goes through: an answered request is one the server saw.
  The client then exits without releasing (the server is stopped next).
* ``waiters``: W (``--waiters``) raw HTTP/1.1 long-polls, one connection each from this
  process's event loop, queue on one held name as the SDK sends them (a request id,
  ``wait`` up to the server's max_poll, ``wait_total`` the rest of ``--cap``, polled again
  after a poll's timeout). The holder releases; each grantee releases once granted.
  Arrival order: ``--arrival paced`` (default) sends one waiter at a time, ``--gap`` s
  apart, then reads the server's queue (its order of enqueueing) with one inspect;
  ``confirm`` sends the next waiter only once an inspect shows the last one queued (exact,
  but each inspect lists the whole queue: O(W^2), for small W). Grant order is token
  order. Reported: inversions (pairs granted in the other order) of grants against the
  queue and the send order, and of the queue against the send order; handoff latency from
  a release being sent (the holder's, then each grantee's) to the next grantee's answer
  being read (one process, one ``time.monotonic()``); total time from the holder's release
  to the last grantee's release answer; server RSS per queued waiter.

Each phase first waits (``--quiet-wait``) for a quiet machine, and records the CPU others
used ("other"). Results: ``bench/results/holds_bench.json`` and ``.md``. Usage::

    .venv/bin/python bench/holds_bench.py                      # memory://, the defaults
    .venv/bin/python bench/holds_bench.py --holds 1 1000 --waiters 1000 --window 5
    .venv/bin/python bench/holds_bench.py --store memory --store file-full
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import queue
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import uvloop

# bench/common.py and bench/http_bench.py (the folder of the script run is first on sys.path)
from common import Json, Sample, fmt, git, latency_summary, wait_for_quiet, write_reports
from http_bench import RawConnection, fs_type, machine_info, running_server

from lockd._lease import RENEW_FRACTION

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
RENEWALS_PER_TTL = round(1 / RENEW_FRACTION)  # the SDK renews at ttl/3
HOLDS_SHOWN = ("status", "acquired", "acquire_s", "renewals_per_s", "expected_renewals_per_s",
               "unanswered_renewals_per_s", "states_after_window", "error")  # fmt: skip
WAITERS_SHOWN = ("granted", "inversions_vs_queue", "inversions_vs_send", "handoff", "total_s",
                 "errors")  # fmt: skip


def ratio(a: float, b: float, digits: int = 1) -> float | None:
    """a / b rounded to ``digits`` places (an int for 0), None when b is 0."""
    return round(a / b, digits or None) if b else None


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- holds: one client process, N names -----------------------------------------------------


def count_requests() -> Counter[str]:
    """Count every request of this process's httpx async clients, by route and status.

    Keys: ``"extend 200"``, ``"acquire 200"``, ``"other 200"``..., and ``"extend failed"``
    for a request that got no answer. Updated on the SDK's I/O thread.
    """
    counts: Counter[str] = Counter()
    original = httpx.AsyncHTTPTransport.handle_async_request

    async def counted(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        route = path.rsplit("/", 1)[-1] if request.method == "POST" else "other"
        try:
            response = await original(self, request)
        except BaseException:
            counts[f"{route} failed"] += 1
            raise
        counts[f"{route} {response.status_code}"] += 1
        return response

    httpx.AsyncHTTPTransport.handle_async_request = counted  # type: ignore[method-assign]
    return counts


def holds_client(
    url: str, server_pid: int, n: int, ttl: float, window: float, cap: float, out_q: mp.Queue[Json]
) -> None:
    """The client process: acquire ``n`` names, hold them ``window`` s, report, exit."""
    import lockd  # in the child only: the parent never opens the SDK's I/O thread

    logging.getLogger("lockd").setLevel(logging.ERROR)  # at_risk/lost: counted, not logged
    counts = count_requests()
    out: Json = {"holds": n, "status": "error", "acquired": 0}
    try:
        client = lockd.Client(url)
        rss = {"before": rss_kib(server_pid)}
        run = uuid.uuid4().hex[:6]
        locks: list[lockd.Lock] = []
        latencies: list[float] = []
        errors: list[str] = []
        began, capped = time.monotonic(), False
        for i in range(n):
            t0 = time.monotonic()
            if t0 - began >= cap:
                capped = True
                break
            lock = client.lock(f"hold-{run}-{i}", ttl=ttl)
            try:
                lock.acquire(wait=0)
            except lockd.LockError as exc:
                errors.append(repr(exc))
                continue
            latencies.append(time.monotonic() - t0)
            locks.append(lock)
        acquire_s = time.monotonic() - began
        rss["after_acquire"] = rss_kib(server_pid)
        states = Counter(lock.state.value for lock in locks)
        before, first = counts.copy(), Sample.take([server_pid])
        time.sleep(window)
        last, after = Sample.take([server_pid]), counts.copy()
        rss["after_window"] = rss_kib(server_pid)
        wall = last.wall - first.wall
        in_window = dict(sorted((after - before).items()))
        unanswered = in_window.get("extend failed", 0)
        renewals = sum(v for k, v in in_window.items() if k.startswith("extend ")) - unanswered
        server_cpu, client_cpu = last.target_cpu - first.target_cpu, last.own_cpu - first.own_cpu
        out |= {
            "status": "did not finish" if capped else "finished", "acquired": len(locks),
            "acquire_errors": len(errors), "first_errors": errors[:3],
            "acquire_s": round(acquire_s, 3), "holds_per_s": ratio(len(locks), acquire_s),
            "acquire_latency": latency_summary(latencies), "states_after_acquire": dict(states),
            "window_s": round(wall, 3), "requests_in_window": in_window,
            "renewals_per_s": ratio(renewals, wall),
            "expected_renewals_per_s": round(len(locks) * RENEWALS_PER_TTL / ttl, 1),
            "unanswered_renewals_per_s": ratio(unanswered, wall),
            "states_after_window": dict(Counter(lock.state.value for lock in locks)),
            "client_cpu_cores": ratio(client_cpu, wall, 3),
            "server_cpu_cores": ratio(server_cpu, wall, 3),
            "server_cpu_us_per_renewal": ratio(server_cpu * 1e6, renewals),
            "other_cpu_cores": round(last.others(first), 3), "server_rss_kib": rss,
            "server_rss_bytes_per_hold": ratio(
                (rss["after_acquire"] - rss["before"]) * 1024, len(locks), 0),
        }  # fmt: skip
    except Exception as exc:
        out["error"] = repr(exc)
    # No client.close(): the holds end with the server, and closing with many renewals in
    # flight took from 0.2 to over 30 s here. os._exit skips the SDK's exit hook too.
    out_q.put(out)
    out_q.close()
    out_q.join_thread()
    os._exit(0)


def run_holds(url: str, server_pid: int, n: int, args: argparse.Namespace) -> Json:
    """Run one client process for ``n`` holds; kill it if it outlives cap + window."""
    ctx = mp.get_context("spawn")
    out_q: mp.Queue[Json] = ctx.Queue()
    job = (url, server_pid, n, args.ttl, args.window, args.cap, out_q)
    proc = ctx.Process(target=holds_client, args=job, daemon=True)
    proc.start()
    try:
        return out_q.get(timeout=args.cap + args.window + 120)
    except queue.Empty:
        return {"holds": n, "status": "error", "acquired": 0, "error": "client gave no result"}
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()


# --- waiters: W raw long-polls on one name --------------------------------------------------


@dataclass
class Waiter:
    """One queued acquire: its send order, times (time.monotonic) and outcome."""

    index: int
    owner: str
    granted: float | None = None
    released: float | None = None
    done: float | None = None
    token: int | None = None
    polls: int = 0
    error: str | None = None


async def post(conn: RawConnection, path: str, body: Json) -> tuple[int, bytes]:
    """One JSON POST on ``conn`` (written before the first await)."""
    return await conn.call("POST", path, json.dumps(body).encode())


async def take_turn(
    conn: RawConnection, w: Waiter, path: str, ttl: float, deadline: float, max_poll: float
) -> None:
    """Long-poll until granted (polling again after a poll's timeout), then release."""
    try:
        while True:
            left = max(0.0, deadline - time.monotonic())
            body = {"owner": w.owner, "ttl": ttl, "wait": min(left, max_poll),
                    "wait_total": left, "request_id": w.owner}  # fmt: skip
            w.polls += 1
            status, data = await post(conn, f"{path}/acquire", body)
            if status == 200:
                break
            if status != 409 or b'"timeout"' not in data or time.monotonic() >= deadline:
                w.error = f"acquire {status} {data[:200]!r}"
                return
        w.granted = time.monotonic()
        w.token = int(json.loads(data)["token"])
        w.released = time.monotonic()
        status, data = await post(conn, f"{path}/release", {"owner": w.owner, "token": w.token})
        w.done = time.monotonic()
        if status != 200:
            w.error = f"release {status} {data[:200]!r}"
    except Exception as exc:
        w.error = repr(exc)
    finally:
        conn.close()


def inversions(seq: list[int]) -> int:
    """Pairs (i < j) with seq[i] > seq[j], for distinct values (Fenwick tree, O(n log n))."""
    rank = {v: r + 1 for r, v in enumerate(sorted(seq))}
    tree, total = [0] * (len(seq) + 1), 0
    for seen, value in enumerate(seq):
        i, below = rank[value], 0
        while i > 0:
            below, i = below + tree[i], i & (i - 1)
        total += seen - below
        i = rank[value]
        while i < len(tree):
            tree[i], i = tree[i] + 1, i + (i & -i)
    return total


async def run_waiters(url: str, server_pid: int, args: argparse.Namespace) -> Json:
    """Queue ``args.waiters`` on one held name, release it, and follow the handoffs."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = f"/v1/locks/queue-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + args.cap
    http = httpx.AsyncClient(base_url=url, timeout=args.cap)  # an inspect lists every waiter
    max_poll = float((await http.get("/v1/info")).json()["max_poll"])
    grant = (await http.post(f"{path}/acquire", json={"owner": "holder", "ttl": args.cap})).json()
    rss_before = rss_kib(server_pid)
    waiters = [Waiter(i, f"w{i}") for i in range(args.waiters)]
    tasks: list[asyncio.Task[None]] = []
    control = await RawConnection.open(host, port) if args.arrival == "confirm" else None
    began = time.monotonic()
    for w in waiters:  # one at a time; a connection idle for 5 s would be closed by uvicorn
        conn = await RawConnection.open(host, port)
        tasks.append(asyncio.create_task(take_turn(conn, w, path, args.ttl, deadline, max_poll)))
        await asyncio.sleep(0)  # the task sends its request
        while control is not None:
            status, data = await control.call("GET", path, None)
            if status != 200 or len(json.loads(data)["waiters"]) > w.index:
                break
        if control is None and args.gap > 0:
            await asyncio.sleep(args.gap)
    if control is not None:
        control.close()
    settle = time.monotonic() + 10
    while True:  # the server's queue, in its order (owner names)
        queue_order = [str(q["owner"]) for q in (await http.get(path)).json()["waiters"]]
        if len(queue_order) >= args.waiters or time.monotonic() > settle:
            break
        await asyncio.sleep(0.05)
    await http.aclose()
    queue_s = time.monotonic() - began
    rss_queued = rss_kib(server_pid)
    first, conn = Sample.take([server_pid]), await RawConnection.open(host, port)
    release_sent = time.monotonic()
    await post(conn, f"{path}/release", {"owner": "holder", "token": grant["token"]})
    conn.close()
    await asyncio.gather(*tasks)
    last = Sample.take([server_pid])
    granted = sorted((w for w in waiters if w.token is not None), key=lambda w: w.token or 0)
    sent = [release_sent] + [w.released or 0.0 for w in granted]  # release i -> grant i + 1
    handoffs = [(w.granted or 0.0) - before for w, before in zip(granted, sent, strict=False)]
    queue_rank = {owner: r for r, owner in enumerate(queue_order)}
    in_queue = [w for w in granted if w.owner in queue_rank]
    end = max((w.done for w in granted if w.done is not None), default=release_sent)
    total, wall, n = end - release_sent, last.wall - first.wall, len(granted)
    server_cpu, client_cpu = last.target_cpu - first.target_cpu, last.own_cpu - first.own_cpu
    errors = [w.error for w in waiters if w.error]
    return {
        "waiters": args.waiters, "arrival": args.arrival, "queue_s": round(queue_s, 3),
        "gap_s": args.gap if args.arrival == "paced" else None,
        "queued_seen": len(queue_order), "granted": n,
        "repolls": sum(max(0, w.polls - 1) for w in waiters),
        "inversions_vs_queue": inversions([queue_rank[w.owner] for w in in_queue]),
        "inversions_vs_send": inversions([w.index for w in granted]),
        "queue_inversions_vs_send": inversions([int(owner[1:]) for owner in queue_order]),
        "handoff": latency_summary(handoffs), "total_s": round(total, 3),
        "handoffs_per_s": ratio(n, total),
        "server_cpu_us_per_handoff": ratio(server_cpu * 1e6, n),
        "client_cpu_us_per_handoff": ratio(client_cpu * 1e6, n),
        "server_cpu_cores": ratio(server_cpu, wall, 3),
        "client_cpu_cores": ratio(client_cpu, wall, 3),
        "other_cpu_cores": round(last.others(first), 3),
        "server_rss_kib": {"before": rss_before, "queued": rss_queued},
        "server_rss_bytes_per_waiter": ratio((rss_queued - rss_before) * 1024, args.waiters, 0),
        "errors": len(errors), "first_errors": errors[:3],
    }  # fmt: skip


# --- report ---------------------------------------------------------------------------------


def row(*cells: object) -> str:
    """A markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_report(report: Json) -> str:
    """The summary tables."""
    m, cfg = report["machine"], report["config"]
    dirty = " (+ uncommitted src/ changes)" if m["src_uncommitted_changes"] else ""
    lines = [
        "# lockd holds and waiters (the session design's baseline)",
        "",
        f"{report['date']} · {m['nproc']} cores ({m['cpu_model']}) · Python {m['python']} · "
        f"commit {m['git_commit_full'][:12]}{dirty} · ttl {cfg['ttl']} s, "
        f"window {cfg['window']} s, cap {cfg['cap']} s",
        "",
        "## Holds from one client process (sync SDK)",
        "",
        row("store", "holds", "result", "acquire s", "holds/s", "renewals/s (expected)",
            "unanswered/s", "held / at_risk / lost after window", "client CPU", "server CPU",
            "server RSS MiB", "RSS B/hold"),
        row("---", "---:", "---", *["---:"] * 9),
    ]  # fmt: skip
    for run in report["runs"]:
        for h in run["holds"]:
            s, g = h.get("states_after_window", {}), h.get
            rss = g("server_rss_kib", {}).get("after_acquire")
            held = "" if h["status"] == "finished" else f", {h['acquired']:,} held"
            lines.append(row(
                run["store"], fmt(h["holds"]), h["status"] + held, fmt(g("acquire_s"), 2),
                fmt(g("holds_per_s")),
                f"{fmt(g('renewals_per_s'))} ({fmt(g('expected_renewals_per_s'))})",
                fmt(g("unanswered_renewals_per_s")),
                " / ".join(fmt(s.get(k, 0)) for k in ("held", "at_risk", "lost")),
                fmt(g("client_cpu_cores"), 2), fmt(g("server_cpu_cores"), 2),
                fmt(rss / 1024 if rss else None), fmt(g("server_rss_bytes_per_hold")),
            ))  # fmt: skip
    lines += [
        "",
        "## Waiters on one name (raw HTTP long-polls, one process)",
        "",
        row("store", "waiters", "arrival", "queued in s", "granted", "inversions vs queue / send",
            "queue vs send", "handoff p50 / p99 ms", "total s", "handoffs/s",
            "server µs/handoff", "RSS B/waiter"),
        row("---", "---:", "---", *["---:"] * 9),
    ]  # fmt: skip
    for run in report["runs"]:
        if (w := run.get("waiters")) is not None:
            lines.append(row(
                run["store"], fmt(w["waiters"]), w["arrival"], fmt(w["queue_s"], 2),
                fmt(w["granted"]), f"{w['inversions_vs_queue']:,} / {w['inversions_vs_send']:,}",
                fmt(w["queue_inversions_vs_send"]),
                f"{fmt(w['handoff']['p50_ms'], 2)} / {fmt(w['handoff']['p99_ms'], 2)}",
                fmt(w["total_s"], 2), fmt(w["handoffs_per_s"]),
                fmt(w["server_cpu_us_per_handoff"]), fmt(w["server_rss_bytes_per_waiter"]),
            ))  # fmt: skip
    lines += [
        "",
        "Renewals/s: extend requests the server answered during the window (expected: holds "
        "x 3 / ttl); unanswered: timed out or failed in the client. CPU: cores used during "
        "the window. Inversions: pairs of waiters granted in the other order than the "
        "server queued them, or than they were sent.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--store", action="append", metavar="URL",
                        help="store URL or alias (memory, file-full...); repeatable")  # fmt: skip
    parser.add_argument("--holds", type=int, nargs="*", default=[1, 1000, 100000])
    parser.add_argument("--ttl", type=float, default=10.0, help="ttl of every hold (s)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds holds are kept")
    parser.add_argument("--cap", type=float, default=300.0, help="time cap per phase (s)")
    parser.add_argument("--waiters", type=int, default=10000, help="0: skip the waiters phase")
    parser.add_argument("--arrival", choices=("paced", "confirm"), default="paced")
    parser.add_argument("--gap", type=float, default=0.001, help="paced: seconds between sends")
    parser.add_argument("--quiet-wait", type=float, default=4.0)
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    parser.add_argument("--tmp-base", help="parent directory for TMPDIR (default: system temp)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores: list[str] = args.store or ["memory"]
    began = time.monotonic()
    config = {k: v for k, v in vars(args).items() if k not in ("results", "tmp_base")}
    report: Json = {
        "benchmark": "lockd holds and waiters",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info() | {"git_commit_full": git("rev-parse", "HEAD")},
        "config": config,
        "runs": [],
    }
    for spec in stores:
        run: Json = {"store": spec, "holds": [], "waiters": None}
        for n in args.holds:
            quiet = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            with running_server(spec, args.tmp_base) as server:
                run["store_url"] = server.store_url
                run["data_fs"] = fs_type(server.data_dir) if server.data_dir else None
                h = run_holds(server.url, server.pid, n, args) | {"quiet_wait": quiet}
            run["holds"].append(h)
            print(f"{spec} holds {n:,}:", {k: h.get(k) for k in HOLDS_SHOWN}, flush=True)
        if args.waiters > 0:
            quiet = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            with running_server(spec, args.tmp_base) as server:
                w = uvloop.run(run_waiters(server.url, server.pid, args))
            run["waiters"] = w | {"quiet_wait": quiet}
            print(f"{spec} waiters:", {k: w.get(k) for k in WAITERS_SHOWN}, flush=True)
        report["runs"].append(run)
    report["total_seconds"] = round(time.monotonic() - began, 1)
    json_path, md_path = write_reports(report, markdown_report(report), args.results, "holds_bench")
    print(f"wrote {json_path} and {md_path.name} in {report['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
