"""Redis benchmark: lockd against redis-py's Lock, python-redis-lock and pottery's Redlock.

Starts its own ``redis-server`` processes (``tests/redisproc.py``) and measures, in one
run, every library against the same Redis:

* ``uncontended``: one thread, sync APIs, acquire+release pairs on a name of its own,
  for lockd (blocking acquire, ``wait=30``, and a try-once acquire, ``wait=0``), redis-py
  ``Redis.lock()``, python-redis-lock and pottery's ``Redlock`` on one master, next to the
  floor: ``SET key val NX PX ttl`` + ``EVALSHA`` of a compare-and-delete script on one
  redis-py connection. Pairs/s, ratio to the floor, p50/p99 per pair, and the CPU this
  process (all its threads) and redis-server spent per pair. Each library runs
  ``--rounds`` short slices after one warm-up, interleaved: every round runs each
  library once, in an order rotated by one each round, so that a change in the machine's
  load (which moves every figure by up to 2x here) falls on all of them alike. Each
  round's rate is also taken relative to the floor's in the same round; the goal is
  judged on the median of the per-round ratios.
* ``contended``: ``--contenders`` OS processes share one lock; each loops: acquire
  (blocking), ``GET`` a counter key, increment it locally, ``SET`` it back, release.
  Critical sections/s, wait p50/p99 (from calling acquire to holding), per-process
  counts, Jain's fairness index and lost updates (critical sections the processes
  counted minus the counter's final value). The counter is on the lock's Redis. Its
  floor, "strict turns", is the least any strict-FIFO lock can cost: a baton passed round
  a ring of the processes with BLPOP and RPUSH (one wake-up of the next process per
  critical section, and nothing else).
* ``redlock``: the contended test on 3 independent redis-server nodes: lockd's
  ``redlock://`` backend against pottery's Redlock with the same 3 masters. The counter
  lives on a 4th redis-server, so the lock nodes carry lock traffic only. When this
  lockd has no ``redlock://`` backend, its row is marked "not available".

The machine may be shared, so each phase first waits (``--quiet-wait``) for a quiet
moment and records the CPU everything else used meanwhile ("other").

Usage::

    .venv/bin/python bench/redis_bench.py                  # everything (about 3 minutes)
    .venv/bin/python bench/redis_bench.py --quick          # short durations, one round
    .venv/bin/python bench/redis_bench.py --section contended --contention-duration 10

Results go to ``bench/results/redis_bench.json`` and ``bench/results/redis_bench.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path

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

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.redisproc import RedisProcess, running_redis_nodes  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
SECTIONS = ("uncontended", "contended", "redlock")
UNCONTENDED_LIBS = ("floor", "lockd", "lockd-try", "redis-py", "python-redis-lock", "pottery")
CONTENDED_LIBS = ("turns", "lockd", "redis-py", "python-redis-lock", "pottery")
FLOORS = ("floor", "turns")
REDLOCK_LIBS = ("lockd-redlock", "pottery")
LABELS = {
    "floor": "floor: SET NX PX + EVALSHA",
    "turns": "floor: strict turns (baton)",
    "lockd": "lockd (wait=30)",
    "lockd-try": "lockd (wait=0)",
    "lockd-redlock": "lockd redlock://",
    "redis-py": "redis-py Lock",
    "python-redis-lock": "python-redis-lock",
    "pottery": "pottery Redlock",
}
RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
NOT_AVAILABLE = "not available"


# --- the locks under test -------------------------------------------------------------------


@dataclass
class Handle:
    """One library's lock on one name, reduced to acquire/release/token/close."""

    acquire: Callable[[], None]
    release: Callable[[], None]
    close: Callable[[], None]
    token: Callable[[], int | None] = lambda: None


@dataclass(frozen=True)
class Target:
    """Where the locks live: lockd's store URL and the plain Redis URLs of the lock nodes."""

    lockd_url: str
    redis_urls: tuple[str, ...]


def open_handle(
    lib: str, target: Target, name: str, ttl: float, wait: float, turn: int = 0, turns: int = 1
) -> Handle:
    """Open ``lib``'s lock on ``name``; acquire blocks up to ``wait`` s (raising after).
    ``turn`` of ``turns``: this process's place in the ring of the strict-turns floor."""
    if lib in ("lockd", "lockd-try", "lockd-redlock"):
        return _lockd_handle(target.lockd_url, name, ttl, 0.0 if lib == "lockd-try" else wait)
    conns = [redis.Redis.from_url(url) for url in target.redis_urls]

    def close() -> None:
        for conn in conns:
            conn.close()

    if lib == "floor":
        return _floor_handle(conns[0], name, ttl, close)
    if lib == "turns":
        return _turns_handle(conns[0], name, wait, turn, turns, close)
    if lib == "redis-py":
        lock = conns[0].lock(f"bench:{name}", timeout=ttl, blocking_timeout=wait)

        def acquire_redis_py() -> None:
            if not lock.acquire():
                raise TimeoutError(f"redis-py Lock {name!r} not acquired in {wait} s")

        return Handle(acquire_redis_py, lock.release, close)
    if lib == "python-redis-lock":
        import redis_lock

        # Its acquire timeout may not exceed expire; without one it BLPOPs until granted.
        prl = redis_lock.Lock(conns[0], f"bench:{name}", expire=max(1, round(ttl)))
        return Handle(lambda: _check(prl.acquire(), name), prl.release, close)
    if lib == "pottery":
        from pottery import Redlock

        redlock = Redlock(key=f"bench:{name}", masters=set(conns), auto_release_time=ttl)
        return Handle(lambda: _check(redlock.acquire(timeout=wait), name), redlock.release, close)
    raise ValueError(f"unknown library {lib!r}")


def _check(acquired: object, name: str) -> None:
    if not acquired:
        raise TimeoutError(f"{name!r} not acquired")


def _lockd_handle(url: str, name: str, ttl: float, wait: float) -> Handle:
    import lockd

    client = lockd.Client(url)
    lock = client.lock(name, ttl=ttl, wait=wait)

    def acquire() -> None:
        lock.acquire()

    return Handle(acquire, lock.release, client.close, lambda: lock.token)


def _floor_handle(conn: redis.Redis, name: str, ttl: float, close: Callable[[], None]) -> Handle:
    """Two round trips: SET NX PX, then EVALSHA compare-and-delete."""
    key = f"bench:{name}"
    ttl_ms = round(ttl * 1000)
    sha = conn.script_load(RELEASE_LUA)
    held = [""]

    def acquire() -> None:
        token = uuid.uuid4().hex
        if not conn.set(key, token, nx=True, px=ttl_ms):
            raise RuntimeError(f"{key} is taken")
        held[0] = token

    def release() -> None:
        if conn.evalsha(sha, 1, key, held[0]) != 1:
            raise RuntimeError(f"{key} was not held")

    return Handle(acquire, release, close)


class RoundOver(Exception):
    """The strict-turns floor's run has ended (its baton became a stop sign)."""


def turn_list(name: str, turn: int) -> str:
    """The list the strict-turns floor's process ``turn`` pops its baton from."""
    return f"bench:{name}:turn:{turn}"


def _turns_handle(
    conn: redis.Redis, name: str, wait: float, turn: int, turns: int, close: Callable[[], None]
) -> Handle:
    """The least any strict-FIFO lock costs: one baton passed round a ring of processes,
    each waiting for it with BLPOP on a list of its own and passing it on with RPUSH. No
    queue, no lease, no token: only the wake-up of the next process per critical section.
    Ending: a process done with its turns passes on a stop sign once it has the baton."""
    mine, after = turn_list(name, turn), turn_list(name, (turn + 1) % turns)
    stopped = [False]

    def acquire() -> None:
        item = conn.blpop([mine], timeout=wait)
        if item is None:
            raise TimeoutError(f"{name!r}: no baton in {wait} s")
        if item[1] == b"stop":
            conn.rpush(after, "stop")
            stopped[0] = True
            raise RoundOver

    def finish() -> None:
        if not stopped[0]:  # the baton (or the stop sign) comes round once more
            conn.blpop([mine], timeout=wait)
            conn.rpush(after, "stop")
        close()

    def release() -> None:
        conn.rpush(after, "baton")

    return Handle(acquire, release, finish)


def versions() -> Json:
    """Versions of the libraries compared and of redis-server."""
    found = package_versions(("lockd", "redis", "hiredis", "pottery", "python-redis-lock"))
    binary = shutil.which("redis-server")
    if binary:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        words = [w for w in out.stdout.split() if w.startswith("v=")]
        found["redis-server"] = words[0][2:] if words else out.stdout.strip()
    return found


def lockd_unavailable(url: str) -> str | None:
    """None when ``lockd.Client(url)`` opens; otherwise why not."""
    import lockd

    try:
        lockd.Client(url).close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# --- uncontended ----------------------------------------------------------------------------


def run_pairs(
    handle: Handle, warmup: float, duration: float, redis_pids: list[int]
) -> tuple[list[float], float, Sample, Sample]:
    """Acquire+release pairs for ``warmup`` s, then ``duration`` s measured."""
    perf = time.perf_counter
    end = perf() + warmup
    while perf() < end:
        handle.acquire()
        handle.release()
    latencies: list[float] = []
    first = Sample.take(redis_pids)
    end = first.wall + duration
    t1 = first.wall
    while t1 < end:
        t0 = perf()
        handle.acquire()
        handle.release()
        t1 = perf()
        latencies.append(t1 - t0)
    last = Sample.take(redis_pids)
    return latencies, last.wall - first.wall, first, last


def median_round_ratio(rounds: list[Json], base: list[Json]) -> float:
    """The median over the interleaved rounds of one rate divided by ``base``'s rate in
    the same round (a change in the machine's load falls on both alike)."""
    ratios = [x["pairs_per_s"] / y["pairs_per_s"] for x, y in zip(rounds, base, strict=True)]
    return float(statistics.median(ratios))


def uncontended_section(server: RedisProcess, args: argparse.Namespace) -> Json:
    """Every library's uncontended pairs on the same Redis, in ``--rounds`` interleaved
    slices of ``--duration`` seconds each."""
    target = Target(server.url, (server.url,))
    run = uuid.uuid4().hex[:6]
    libs = [lib for lib in UNCONTENDED_LIBS if lib in args.libs or lib == "floor"]
    pids = [server.process.pid]
    per_lib: dict[str, Json] = {
        lib: {"rounds": [], "latencies": [], "elapsed": 0.0, "own_cpu": 0.0, "redis_cpu": 0.0}
        for lib in libs
    }
    handles = {}
    try:
        for lib in libs:
            handles[lib] = open_handle(lib, target, f"pairs-{run}-{lib}", args.ttl, args.wait)
            run_pairs(handles[lib], args.warmup, 0.0, pids)
        for round_no in range(args.rounds):
            quiet = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
            shift = round_no % len(libs)
            line = []
            for lib in libs[shift:] + libs[:shift]:
                lat, elapsed, first, last = run_pairs(handles[lib], 0.0, args.duration, pids)
                acc = per_lib[lib]
                acc["latencies"] += lat
                acc["elapsed"] += elapsed
                acc["own_cpu"] += last.own_cpu - first.own_cpu
                acc["redis_cpu"] += last.target_cpu - first.target_cpu
                acc["rounds"].append(
                    {
                        "round": round_no + 1,
                        "pairs": len(lat),
                        "pairs_per_s": round(len(lat) / elapsed, 1),
                        "other_cpu_cores": round(last.others(first), 3),
                        "quiet_wait": quiet,
                    }
                )
                line.append(f"{lib} {len(lat) / elapsed:,.0f}")
            print(f"  round {round_no + 1}: " + ", ".join(line) + " pairs/s", flush=True)
    finally:
        for handle in handles.values():
            handle.close()
    floor_rate = len(per_lib["floor"]["latencies"]) / per_lib["floor"]["elapsed"]
    rows = []
    for lib in libs:
        acc = per_lib[lib]
        pairs = len(acc["latencies"])
        rate = pairs / acc["elapsed"]
        rows.append(
            {
                "library": lib,
                "label": LABELS[lib],
                "pairs": pairs,
                "pairs_per_s": round(rate, 1),
                "ratio_to_floor": round(rate / floor_rate, 3),
                "median_round_ratio_to_floor": round(
                    median_round_ratio(acc["rounds"], per_lib["floor"]["rounds"]), 3
                ),
                "latency": latency_summary(acc["latencies"]),
                "client_cpu_us_per_pair": round(acc["own_cpu"] / pairs * 1e6, 1),
                "redis_cpu_us_per_pair": round(acc["redis_cpu"] / pairs * 1e6, 1),
                "rounds": acc["rounds"],
            }
        )
    return {"redis": server.url, "rows": rows}


# --- contention -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentionSpec:
    """What every contending process does (picklable, for spawned processes)."""

    lib: str
    target: Target
    counter_url: str
    counter_key: str
    lock_name: str
    duration: float
    ttl: float
    wait: float
    processes: int


@dataclass
class ContenderReport:
    """One contending process's results."""

    index: int
    count: int = 0
    waits: list[float] = field(default_factory=list)
    held_at: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    cpu_s: float = 0.0


def contender(
    index: int, spec: ContentionSpec, barrier: Barrier, results: mp.Queue[ContenderReport]
) -> None:
    """One contending process: read-modify-write of the counter under the lock until time's up."""
    out = ContenderReport(index)
    counter = redis.Redis.from_url(spec.counter_url)
    handle: Handle | None = None
    try:
        handle = open_handle(
            spec.lib, spec.target, spec.lock_name, spec.ttl, spec.wait, index, spec.processes
        )
        counter.ping()
        barrier.wait(timeout=120)
        out.started = time.monotonic()
        cpu0 = time.process_time()
        end = out.started + spec.duration
        perf = time.perf_counter
        while time.monotonic() < end:
            t0 = perf()
            try:
                handle.acquire()
            except RoundOver:
                break
            t1 = perf()
            out.waits.append(t1 - t0)
            out.held_at.append(t1)  # CLOCK_MONOTONIC on Linux: comparable across processes
            try:
                token = handle.token()
                if token is not None:
                    out.tokens.append(token)
                value = int(counter.get(spec.counter_key) or 0)  # read-modify-write,
                counter.set(spec.counter_key, value + 1)  # protected by the lock alone
            finally:
                handle.release()
            out.count += 1
        out.finished = time.monotonic()
        out.cpu_s = time.process_time() - cpu0
    except Exception as exc:
        out.errors.append(repr(exc))
        out.finished = out.finished or time.monotonic()
        with contextlib.suppress(Exception):
            barrier.abort()
    finally:
        with contextlib.suppress(Exception):
            if handle is not None:
                handle.close()
        counter.close()
        results.put(out)


def run_contention(spec: ContentionSpec, processes: int, redis_pids: list[int]) -> Json:
    """Critical sections/s, waits, fairness and lost updates of processes sharing one lock."""
    ctx = mp.get_context("spawn")
    counter = redis.Redis.from_url(spec.counter_url)
    counter.set(spec.counter_key, 0)
    if spec.lib == "turns":  # the first process starts with the baton
        with redis.Redis.from_url(spec.target.redis_urls[0]) as conn:
            conn.rpush(turn_list(spec.lock_name, 0), "baton")
    barrier = ctx.Barrier(processes + 1)
    queue: mp.Queue[ContenderReport] = ctx.Queue()
    procs = [
        ctx.Process(target=contender, args=(i, spec, barrier, queue), daemon=True)
        for i in range(processes)
    ]
    outs, first, last = run_contenders(
        procs, barrier, queue, redis_pids, 120, spec.duration + spec.wait + 120
    )
    final = int(counter.get(spec.counter_key) or 0)
    counter.close()
    return contention_result(spec, outs, final, first, last)


def contention_result(
    spec: ContentionSpec, outs: list[ContenderReport], final: int, first: Sample, last: Sample
) -> Json:
    """Summarise the contenders' reports."""
    outs.sort(key=lambda o: o.index)
    counts = [o.count for o in outs]
    waits = [w for o in outs for w in o.waits]
    tokens = [t for o in outs for t in o.tokens]
    total = sum(counts)
    order = sorted((t, o.index) for o in outs for t in o.held_at)
    changes = sum(1 for a, b in itertools.pairwise(order) if a[1] != b[1])
    started = min((o.started for o in outs if o.started), default=0.0)
    elapsed = max((o.finished for o in outs), default=0.0) - started
    wall = last.wall - first.wall
    contenders_cpu = sum(o.cpu_s for o in outs)
    redis_cpu = last.target_cpu - first.target_cpu
    busy = last.machine_cpu - first.machine_cpu
    return {
        "library": spec.lib,
        "label": LABELS[spec.lib],
        "processes": len(outs),
        "lock": {"ttl": spec.ttl, "wait": spec.wait},
        "elapsed_s": round(elapsed, 3),
        "critical_sections": total,
        "cs_per_s": round(total / elapsed, 1) if elapsed > 0 else None,
        "per_process_counts": counts,
        "wait": latency_summary(waits),
        "jain_fairness": jain_index(counts),
        "holder_changes": round(changes / (len(order) - 1), 4) if len(order) > 1 else None,
        "counter_final": final,
        "lost_updates": total - final,
        "duplicate_tokens": len(tokens) - len(set(tokens)) if tokens else None,
        "errors": [e for o in outs for e in o.errors],
        "redis_cpu_cores": round(redis_cpu / wall, 3),
        "contenders_cpu_cores": round(contenders_cpu / wall, 3),
        "redis_cpu_us_per_cs": round(redis_cpu / total * 1e6, 1) if total else None,
        "contenders_cpu_us_per_cs": round(contenders_cpu / total * 1e6, 1) if total else None,
        "other_cpu_cores": round(max(0.0, busy - redis_cpu - contenders_cpu) / wall, 3),
    }


def contention_rows(
    libs: list[str],
    target: Target,
    counter_url: str,
    args: argparse.Namespace,
    pids: list[int],
) -> list[Json]:
    """One contention run per library (a "not available" row for lockd without the scheme)."""
    run = uuid.uuid4().hex[:6]
    rows = []
    for lib in libs:
        spec = ContentionSpec(
            lib,
            target,
            counter_url,
            f"bench:counter-{run}-{lib}",
            f"hot-{run}-{lib}",
            args.contention_duration,
            args.ttl,
            args.wait,
            args.contenders,
        )
        if lib.startswith("lockd"):
            why = lockd_unavailable(spec.target.lockd_url)
            if why is not None:
                print(f"  {LABELS[lib]:28} {NOT_AVAILABLE}: {why}", flush=True)
                rows.append(
                    {"library": lib, "label": LABELS[lib], "status": NOT_AVAILABLE, "reason": why}
                )
                continue
        quiet = wait_for_quiet(args.quiet_threshold, args.quiet_wait)
        row = run_contention(spec, args.contenders, pids)
        row["quiet_wait"] = quiet
        rows.append(row)
        print(
            f"  {LABELS[lib]:28} {row['cs_per_s']:>8,.1f} CS/s  wait p50 {row['wait']['p50_ms']} "
            f"p99 {row['wait']['p99_ms']} ms  Jain {row['jain_fairness']}  "
            f"lost {row['lost_updates']}  counts {row['per_process_counts']}"
            + (f"  errors {row['errors'][:2]}" if row["errors"] else ""),
            flush=True,
        )
    return rows


def contended_section(server: RedisProcess, args: argparse.Namespace) -> Json:
    """Every library contending on one lock on the same Redis; the counter is there too."""
    target = Target(server.url, (server.url,))
    libs = [lib for lib in CONTENDED_LIBS if lib in args.libs or lib in FLOORS]
    rows = contention_rows(libs, target, server.url, args, [server.process.pid])
    return {"redis": server.url, "counter": "on the lock's Redis", "rows": rows}


def redlock_section(args: argparse.Namespace) -> Json:
    """lockd's redlock:// against pottery's Redlock on 3 nodes; the counter on a 4th."""
    with running_redis_nodes(4) as servers:
        nodes, counter = servers[:3], servers[3]
        lockd_url = "redlock://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        target = Target(lockd_url, tuple(n.url for n in nodes))
        print(f"redlock nodes {lockd_url}, counter {counter.url}", flush=True)
        libs = [lib for lib in REDLOCK_LIBS if lib.removesuffix("-redlock") in args.libs]
        pids = [n.process.pid for n in servers]
        rows = contention_rows(libs, target, counter.url, args, pids)
        return {
            "nodes": [n.url for n in nodes],
            "lockd_url": lockd_url,
            "counter": f"a 4th redis-server ({counter.url})",
            "rows": rows,
        }


# --- machine info and reports ---------------------------------------------------------------


def machine_info() -> Json:
    """Cores, CPU model, Python, library versions, commit and load."""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions(),
        **git_state(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def goals(report: Json) -> list[str]:
    """The issue's goals, each with the figures it was judged on."""
    lines = []
    unc = {r["library"]: r for r in report.get("uncontended", {}).get("rows", [])}
    if "lockd" in unc and "redis-py" in unc:
        peer = unc["redis-py"]
        for lib in ("lockd", "lockd-try"):
            if lib in unc:
                mine = unc[lib]
                ratio = median_round_ratio(mine["rounds"], peer["rounds"])
                verdict = "met" if ratio >= 1 else "missed"
                lines.append(
                    f"- Uncontended, {LABELS[lib]} >= redis-py Lock: {fmt(mine['pairs_per_s'])} "
                    f"vs {fmt(peer['pairs_per_s'])} pairs/s; median of the per-round ratios "
                    f"{ratio:.2f}x: **{verdict}**"
                )
    for key, title in (("contended", "Contended (one Redis)"), ("redlock", "Contended RedLock")):
        rows = [r for r in report.get(key, {}).get("rows", []) if "cs_per_s" in r]
        mine_rows = [r for r in rows if r["library"].startswith("lockd")]
        peers = [r for r in rows if not r["library"].startswith("lockd")]
        floor = [r for r in peers if r["library"] in FLOORS]
        peers = [r for r in peers if r["library"] not in FLOORS]
        if not mine_rows:
            lines.append(f"- {title}: lockd {NOT_AVAILABLE}")
            continue
        mine = mine_rows[0]
        if peers:
            best = max(peers, key=lambda r: r["cs_per_s"] or 0)
            verdict = "met" if (mine["cs_per_s"] or 0) >= (best["cs_per_s"] or 0) else "missed"
            lines.append(
                f"- {title}, CS/s >= fastest peer ({best['label']}): "
                f"{fmt(mine['cs_per_s'])} vs {fmt(best['cs_per_s'])}: **{verdict}**"
            )
            fair = [r for r in peers if (r["jain_fairness"] or 0) >= 0.98]
            if fair and best not in fair:
                top = max(fair, key=lambda r: r["cs_per_s"] or 0)
                share = (mine["cs_per_s"] or 0) / (top["cs_per_s"] or 1)
                lines.append(
                    f"  (fastest peer with Jain >= 0.98: {top['label']}, "
                    f"{fmt(top['cs_per_s'])} CS/s; lockd {share:.2f}x)"
                )
        if floor:
            share = (mine["cs_per_s"] or 0) / (floor[0]["cs_per_s"] or 1)
            lines.append(
                f"  (the strict-turns floor, which no FIFO lock can pass: "
                f"{fmt(floor[0]['cs_per_s'])} CS/s; lockd {share:.2f}x)"
            )
        jain = mine["jain_fairness"] or 0.0
        p99 = mine["wait"]["p99_ms"] or 0.0
        lines.append(
            f"- {title}, lockd Jain >= 0.98: {jain:.4f}: "
            f"**{'met' if jain >= 0.98 else 'missed'}**; p99 wait < 30 ms: "
            f"{p99:.2f} ms: **{'met' if p99 < 30 else 'missed'}**"
        )
    lost = [
        (r["label"], r["lost_updates"])
        for key in ("contended", "redlock")
        for r in report.get(key, {}).get("rows", [])
        if "lost_updates" in r
    ]
    if lost:
        bad = [f"{label} {n}" for label, n in lost if n]
        lines.append(
            "- Zero lost updates everywhere: "
            + ("**met**" if not bad else f"**missed** ({', '.join(bad)})")
        )
    return lines


def contention_table(section: Json, processes: int) -> list[str]:
    """Markdown rows of one contention section."""
    lines = [
        f"Counter: {section['counter']}. {processes} processes, sync APIs.",
        "",
        "| library | CS/s | wait p50 ms | wait p99 ms | wait max ms | Jain | holder changes "
        "| lost updates | Redis µs/CS | clients µs/CS | other CPU | per-process counts | errors |",
        "| --- " + "| ---: " * 10 + "| --- | ---: |",
    ]
    for r in section["rows"]:
        if "cs_per_s" not in r:
            lines.append(f"| {r['label']} | {r['status']} |" + " |" * 11)
            continue
        changes = r["holder_changes"]
        lines.append(
            f"| {r['label']} | {fmt(r['cs_per_s'])} | {fmt(r['wait']['p50_ms'], 2)} "
            f"| {fmt(r['wait']['p99_ms'], 2)} | {fmt(r['wait']['max_ms'], 1)} "
            f"| {fmt(r['jain_fairness'], 4)} | {'-' if changes is None else f'{changes:.0%}'} "
            f"| {r['lost_updates']} | {fmt(r['redis_cpu_us_per_cs'])} "
            f"| {fmt(r['contenders_cpu_us_per_cs'])} | {fmt(r['other_cpu_cores'], 2)} "
            f"| {', '.join(str(x) for x in r['per_process_counts'])} | {len(r['errors'])} |"
        )
    return lines


def markdown_report(report: Json) -> str:
    """A short human-readable summary of the JSON report."""
    m, cfg = report["machine"], report["config"]
    dirty = " (+ uncommitted src/ changes)" if m["src_uncommitted_changes"] else ""
    end = m.get("git_commit_at_end")
    if end and (end != m["git_commit"] or m.get("src_uncommitted_changes_at_end")):
        dirty += f" (at the end: {end}"
        dirty += " + uncommitted src/ changes)" if m["src_uncommitted_changes_at_end"] else ")"
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        "# lockd on Redis against redis-py Lock, python-redis-lock and pottery",
        "",
        f"{report['date']} · {m['nproc']} cores ({m['cpu_model']}) · Python {m['python']} · "
        f"commit {m['git_commit']}{dirty} · load average at start "
        f"{', '.join(str(x) for x in m['loadavg_at_start'])}",
        "",
        f"Versions: {pkgs}.",
        "",
        "## Goals",
        "",
        *goals(report),
    ]
    if "uncontended" in report:
        lines += [
            "",
            f"## Uncontended (one thread, sync API, {cfg['warmup_s']} s warm-up, then "
            f"{cfg['rounds']} interleaved rounds of {cfg['duration_s']} s per library)",
            "",
            "| library | pairs/s | ratio to floor | median round ratio | p50 ms | p99 ms "
            "| client µs/pair | Redis µs/pair | slowest, best round | other CPU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for r in report["uncontended"]["rows"]:
            other = sum(x["other_cpu_cores"] for x in r["rounds"]) / len(r["rounds"])
            rates = [x["pairs_per_s"] for x in r["rounds"]]
            lines.append(
                f"| {r['label']} | {fmt(r['pairs_per_s'])} | {r['ratio_to_floor']:.3f} "
                f"| {r['median_round_ratio_to_floor']:.3f} "
                f"| {fmt(r['latency']['p50_ms'], 3)} | {fmt(r['latency']['p99_ms'], 3)} "
                f"| {fmt(r['client_cpu_us_per_pair'])} | {fmt(r['redis_cpu_us_per_pair'])} "
                f"| {fmt(min(rates), 0)}, {fmt(max(rates), 0)} | {other:.2f} |"
            )
    if "contended" in report:
        lines += [
            "",
            f"## Contended, one Redis ({cfg['contention_duration_s']} s)",
            "",
            *contention_table(report["contended"], cfg["contenders"]),
        ]
    if "redlock" in report:
        lines += [
            "",
            f"## Contended RedLock, 3 nodes ({cfg['contention_duration_s']} s)",
            "",
            *contention_table(report["redlock"], cfg["contenders"]),
        ]
    lines += [
        "",
        "µs columns: CPU time per pair or critical section (client: this process, all its "
        "threads; clients: the contending processes). 'other CPU': cores used meanwhile by "
        "every other process on the machine (noise). 'holder changes': how often the next "
        "critical section went to another process (100%: strict turns; about 88%: a random "
        "pick of 8; low: the releaser takes the lock again). Redis µs: every redis-server of "
        "the section (RedLock: the 3 nodes and the counter's). "
        f"ttl {cfg['ttl_s']} s, acquire wait up to {cfg['wait_s']} s; redis-py Lock polls "
        "with its default sleep (0.1 s), pottery retries after a random 0-0.2 s, "
        "python-redis-lock BLPOPs on a signal list. 'floor: strict turns': a baton passed "
        "round a ring of the processes (BLPOP on a list of one's own, RPUSH to the next "
        "one's), the least a strict-FIFO lock can cost.",
        "",
    ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTIONS,
        help="section to run; repeatable; default all",
    )
    parser.add_argument(
        "--lib",
        action="append",
        dest="libs",
        choices=sorted(set(UNCONTENDED_LIBS) - {"floor"}),
        help="library to measure; repeatable; default all (the floor always "
        "runs; lockd also selects lockd redlock://)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short durations, one round, short quiet waits"
    )
    parser.add_argument("--warmup", type=float, help="uncontended warm-up seconds (1)")
    parser.add_argument(
        "--duration", type=float, help="uncontended seconds per library per round (0.5)"
    )
    parser.add_argument("--rounds", type=int, help="uncontended interleaved rounds (16)")
    parser.add_argument("--contenders", type=int, default=8, help="contending processes")
    parser.add_argument("--contention-duration", type=float, help="seconds contended (5)")
    parser.add_argument("--ttl", type=float, default=10.0, help="lock ttl seconds")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds an acquire may wait")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each phase, wait up to this many seconds for a quiet machine (4)",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="cores other processes may use for the machine to count as quiet",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="output directory")
    args = parser.parse_args(argv)
    quick = {
        "warmup": 0.3,
        "duration": 0.3,
        "rounds": 3,
        "contention_duration": 2.0,
        "quiet_wait": 0.5,
    }
    full = {
        "warmup": 1.0,
        "duration": 0.5,
        "rounds": 16,
        "contention_duration": 5.0,
        "quiet_wait": 4.0,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.section = args.section or list(SECTIONS)
    args.libs = args.libs or list(UNCONTENDED_LIBS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    report: Json = {
        "benchmark": "lockd on Redis vs redis-py Lock, python-redis-lock, pottery",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "sections": args.section,
            "libraries": args.libs,
            "quick": args.quick,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "contenders": args.contenders,
            "contention_duration_s": args.contention_duration,
            "ttl_s": args.ttl,
            "wait_s": args.wait,
            "quiet_wait_s": args.quiet_wait,
            "quiet_threshold_cores": args.quiet_threshold,
        },
    }
    if "uncontended" in args.section or "contended" in args.section:
        with running_redis_nodes(1) as (server,):
            print(f"redis-server {server.url} (pid {server.process.pid})", flush=True)
            if "uncontended" in args.section:
                print("uncontended acquire+release pairs", flush=True)
                report["uncontended"] = uncontended_section(server, args)
            if "contended" in args.section:
                print(f"contended: {args.contenders} processes on one lock", flush=True)
                report["contended"] = contended_section(server, args)
    if "redlock" in args.section:
        print(f"contended RedLock: {args.contenders} processes on one lock", flush=True)
        report["redlock"] = redlock_section(args)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # Others may commit or edit src/ while this runs: what was measured is start .. end.
    report["machine"].update({f"{key}_at_end": value for key, value in git_state().items()})
    report["total_seconds"] = round(time.monotonic() - began, 1)
    json_path, md_path = write_reports(report, markdown_report(report), args.results, "redis_bench")
    print(f"wrote {shown_path(json_path)} and {md_path.name} in {report['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
