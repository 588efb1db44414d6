"""Helpers the benchmarks share: CPU readings, statistics, machine info and report files."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent

Json = dict[str, Any]
T = TypeVar("T")


# --- CPU readings ---------------------------------------------------------------------------


def machine_busy_cpu() -> float:
    """CPU seconds all cores spent busy (not idle or waiting for I/O) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(threshold: float, max_wait: float, window: float = 0.5) -> Json:
    """Wait (up to ``max_wait`` s) until other processes use at most ``threshold`` cores.

    This machine may be shared (other test suites): starting a phase in a quiet moment
    makes the figures less noisy. Returns what was seen, to be kept with the phase.
    """
    began = time.monotonic()
    while True:
        t0, c0 = time.perf_counter(), machine_busy_cpu()
        time.sleep(window)
        busy = (machine_busy_cpu() - c0) / (time.perf_counter() - t0)
        waited = time.monotonic() - began
        if busy <= threshold or waited >= max_wait:
            return {"waited_s": round(waited, 2), "busy_cores_before": round(busy, 3)}


@dataclass
class Sample:
    """Wall clock and CPU readings at one instant.

    ``own_cpu``: this process (all its threads); ``target_cpu``: the processes under test
    (the server, the redis-servers); ``machine_cpu``: every core of the machine.
    """

    wall: float
    own_cpu: float
    target_cpu: float
    machine_cpu: float

    @classmethod
    def take(cls, target_pids: Iterable[int]) -> Sample:
        return cls(
            time.perf_counter(),
            time.process_time(),
            sum(process_cpu(pid) for pid in target_pids),
            machine_busy_cpu(),
        )

    def others(self, first: Sample) -> float:
        """Cores used since ``first`` by everything but the targets and this process."""
        wall = self.wall - first.wall
        busy = self.machine_cpu - first.machine_cpu
        ours = (self.target_cpu - first.target_cpu) + (self.own_cpu - first.own_cpu)
        return max(0.0, (busy - ours) / wall)


def run_contenders(
    procs: Sequence[BaseProcess],
    barrier: Barrier,
    results: Queue[T],
    target_pids: Iterable[int],
    start_timeout: float,
    result_timeout: float,
) -> tuple[list[T], Sample, Sample]:
    """Start ``procs``, meet them at ``barrier`` and collect one result from each.

    CPU is sampled from the meeting until the last result arrived; a process still
    alive 10 s after that is killed.
    """
    for proc in procs:
        proc.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=start_timeout)
    first = Sample.take(target_pids)
    outs: list[T] = []
    try:
        outs = [results.get(timeout=result_timeout) for _ in procs]
    finally:
        last = Sample.take(target_pids)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return outs, first, last


# --- statistics -----------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def latency_summary(values: list[float]) -> Json:
    """p50/p90/p99/max/mean in milliseconds."""
    ordered = sorted(values)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "n": len(ordered),
        "p50_ms": ms(percentile(ordered, 50)),
        "p90_ms": ms(percentile(ordered, 90)),
        "p99_ms": ms(percentile(ordered, 99)),
        "max_ms": ms(ordered[-1] if ordered else None),
        "mean_ms": ms(sum(ordered) / len(ordered) if ordered else None),
    }


def jain_index(counts: list[int]) -> float | None:
    """Jain's fairness index, (sum x)^2 / (n * sum x^2), to 4 places; 1.0 is perfectly even."""
    squares = sum(x * x for x in counts)
    if not counts or squares == 0:
        return None
    return round(sum(counts) ** 2 / (len(counts) * squares), 4)


# --- machine info ---------------------------------------------------------------------------


def git(*argv: str) -> str:
    """The output of a git command in this repository ("" on failure)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def git_state() -> Json:
    """The short commit and whether src/ has uncommitted changes."""
    return {
        "git_commit": git("rev-parse", "--short", "HEAD") or None,
        "src_uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" when not found)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def package_versions(packages: Iterable[str]) -> Json:
    """The installed version of each of ``packages`` (those not installed left out)."""
    found: Json = {}
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


# --- reports --------------------------------------------------------------------------------


def fmt(value: object, digits: int = 1) -> str:
    """A table cell: "-" for None, thousands separators, ``digits`` places for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_reports(report: Json, markdown: str, results_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem``.json and ``stem``.md (each through a temp file, then renamed)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = (results_dir / f"{stem}.json", results_dir / f"{stem}.md")
    texts = (json.dumps(report, indent=2) + "\n", markdown)
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


def shown_path(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
