"""Many holds kept by one session through ``lockd serve``: renewal traffic and server memory.

The store side of the session design, measured through the Backend protocol of the
``http://`` backend (the SDK does not keep its holds in sessions yet). For each
``--store`` and each N in ``--holds``, against a fresh ``lockd serve`` (``running_server``
of http_bench.py):

* open one session of ``--ttl`` and acquire N distinct names in it, timed, over
  ``--concurrency`` raw keep-alive connections (``RawConnection`` of http_bench.py: the
  fastest client at hand, since this phase only fills the server); the server's ``VmRSS``
  before and after;
* keep the session alive for ``--window`` s as a client would (one keepalive request
  every ttl/3), counting every request the process sends (httpx's transport, wrapped as
  in holds_bench.py); reported as keepalives/s, next to the N * 3 / ttl extends/s that
  per-hold renewal needs for the same holds (the baseline: today's SDK);
* check the holds are still there after the window (a keepalive answering the ttl, and
  ``--sample`` names inspected at random, each held by the owner);
* revoke the session and time it (every hold ends in one step).

Results: ``bench/results/session_holds_bench.json`` and ``.md``. Usage::

    .venv/bin/python bench/session_holds_bench.py                  # memory, 1 / 1k / 100k
    .venv/bin/python bench/session_holds_bench.py --holds 1000000 --window 10
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

# bench/common.py, bench/http_bench.py and bench/holds_bench.py (the script's folder is on sys.path)
from common import Json, Sample, git, wait_for_quiet, write_reports
from holds_bench import RENEWALS_PER_TTL, count_requests, ratio, rss_kib
from http_bench import RawConnection, machine_info, running_server

import lockd

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
NS = "default"
SHOWN = ("acquired", "acquire_s", "keepalives_per_s", "per_hold_renewals_per_s", "held_after",
         "server_rss_bytes_per_hold", "revoke_s", "error")  # fmt: skip


async def fill(url: str, sid: str, names: list[str], args: argparse.Namespace) -> None:
    """Acquire every name in session ``sid`` over ``args.concurrency`` raw connections."""
    todo = iter(names)
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80

    async def worker() -> None:
        conn = await RawConnection.open(host, port)
        try:
            for name in todo:
                body = {"owner": "bench", "ttl": args.ttl, "session": sid}
                status, data = await conn.call(
                    "POST", f"/v1/locks/{name}/acquire", json.dumps(body).encode()
                )
                if status != 200:
                    raise RuntimeError(f"acquire {name}: {status} {data[:200]!r}")
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))


async def session_holds(url: str, server_pid: int, n: int, args: argparse.Namespace) -> Json:
    """One phase: N holds in one session, kept ``window`` s, then revoked."""
    counts = count_requests()
    out: Json = {"holds": n, "acquired": 0}
    backend = lockd.connect(url)
    await backend.open()
    try:
        rss = {"before": rss_kib(server_pid)}
        sid = await backend.open_session(args.ttl)
        answers: list[float | None] = []

        async def keep() -> None:  # as a client does, from the session's start
            while True:
                await asyncio.sleep(args.ttl / RENEWALS_PER_TTL)
                (answer,) = await backend.keepalive([sid])
                answers.append(None if answer is None else answer.ttl)

        keeper = asyncio.create_task(keep())
        run = uuid.uuid4().hex[:6]
        names = [f"s-{run}-{i}" for i in range(n)]
        began = time.monotonic()
        await fill(url, sid, names, args)
        acquire_s = time.monotonic() - began
        rss["after_acquire"] = rss_kib(server_pid)
        before, first = counts.copy(), Sample.take([server_pid])
        await asyncio.sleep(args.window)
        last, after = Sample.take([server_pid]), counts.copy()
        keeper.cancel()
        ttl_left = answers[-1] if answers else None
        wall = last.wall - first.wall
        in_window = dict(sorted((after - before).items()))
        keepalives = in_window.get("keepalive 200", 0)
        sample = random.sample(names, min(args.sample, n))
        held = 0
        for name in sample:
            info = await backend.inspect(NS, name)
            held += [h.owner for h in info.holders] == ["bench"]
        t0 = time.monotonic()
        await backend.revoke_session(sid)
        revoke_s = time.monotonic() - t0
        rss["after_revoke"] = rss_kib(server_pid)
        gone = 0
        for name in sample:
            gone += not (await backend.inspect(NS, name)).holders
        out |= {
            "acquired": n, "acquire_s": round(acquire_s, 3), "holds_per_s": ratio(n, acquire_s),
            "window_s": round(wall, 3), "requests_in_window": in_window,
            "keepalives_per_s": ratio(keepalives, wall, 2),
            "per_hold_renewals_per_s": round(n * RENEWALS_PER_TTL / args.ttl, 1),
            "session_ttl_after_window": ttl_left,
            "held_after": f"{held}/{len(sample)} sampled",
            "gone_after_revoke": f"{gone}/{len(sample)} sampled",
            "revoke_s": round(revoke_s, 3),
            "server_cpu_cores_in_window": ratio(last.target_cpu - first.target_cpu, wall, 3),
            "other_cpu_cores": round(last.others(first), 3), "server_rss_kib": rss,
            "server_rss_bytes_per_hold": ratio(
                (rss["after_acquire"] - rss["before"]) * 1024, n, 0),
        }  # fmt: skip
    except Exception as exc:
        out["error"] = repr(exc)
    finally:
        await backend.aclose()
    return out


def markdown_report(report: Json) -> str:
    lines = [
        "# Holds in one session through `lockd serve`",
        "",
        f"{report['date']}, commit {report['machine'].get('git_commit_full', '')[:7]}; "
        f"ttl {report['config']['ttl']} s, window {report['config']['window']} s. "
        "Renewal traffic: one keepalive per ttl/3 for the session, against the extends per "
        "hold that renewing each hold needs (the baseline: today's SDK).",
        "",
        "| store | holds | acquired in | keepalives/s | per-hold renewals/s needed | "
        "held after window | server RSS per hold | revoke all |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for run in report["runs"]:
        for h in run["phases"]:
            if "error" in h:
                lines.append(f"| {run['store']} | {h['holds']:,} | error: {h['error']} |")
                continue
            lines.append(
                f"| {run['store']} | {h['holds']:,} | {h['acquire_s']} s | "
                f"{h['keepalives_per_s']} | {h['per_hold_renewals_per_s']:,} | "
                f"{h['held_after']} | {h['server_rss_bytes_per_hold']} B | {h['revoke_s']} s |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", action="append", metavar="SPEC",
                        help="memory (default), file-full, ... as in http_bench.py")  # fmt: skip
    parser.add_argument("--holds", type=int, nargs="*", default=[1, 1000, 100000])
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32, help="acquires in flight")
    parser.add_argument("--sample", type=int, default=200, help="names inspected after")
    parser.add_argument("--quiet-wait", type=float, default=4.0)
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    parser.add_argument("--tmp-base", help="parent directory for TMPDIR (default: system temp)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    config = {k: v for k, v in vars(args).items() if k not in ("results", "tmp_base")}
    report: Json = {
        "benchmark": "lockd holds in one session",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info() | {"git_commit_full": git("rev-parse", "HEAD")},
        "config": config,
        "runs": [],
    }
    for spec in args.store or ["memory"]:
        run: Json = {"store": spec, "phases": []}
        for n in args.holds:
            quiet = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            with running_server(spec, args.tmp_base) as server:
                run["store_url"] = server.store_url
                phase = uvloop.run(session_holds(server.url, server.pid, n, args))
            run["phases"].append(phase | {"quiet_wait": quiet})
            print(f"{spec} {n:,} holds:", {k: phase.get(k) for k in SHOWN}, flush=True)
        report["runs"].append(run)
    report["total_seconds"] = round(time.monotonic() - began, 1)
    stem = "session_holds_bench"
    json_path, md_path = write_reports(report, markdown_report(report), args.results, stem)
    print(f"wrote {json_path} and {md_path.name} in {report['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
