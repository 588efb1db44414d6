"""The ``lockd`` command line against a real server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lockd
from lockd.cli import EXIT_LOCK_LOST, EXIT_NOT_ACQUIRED
from tests.serverproc import ServerProcess, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(f"file://{tmp_path / 'store'}") as s:
        yield s


def lockd_cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCKD_URL": server.url}
    return subprocess.run(
        [sys.executable, "-m", "lockd.cli", *args], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_run_passes_token_and_exit_code(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "env"
    script = f'echo "$LOCKD_NAME $LOCKD_TOKEN" > {out}; exit 7'
    result = lockd_cli(server, "run", "nightly", "--ttl", "5", "--", "sh", "-c", script)
    assert result.returncode == 7, result.stderr
    name, token = out.read_text().split()
    assert name == "nightly" and int(token) >= 1
    with lockd.Client(server.url) as client:
        assert client.inspect("nightly").holders == ()  # released after the child ended


def test_run_not_acquired_within_wait(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with lockd.Client(server.url) as client, client.lock("nightly"):
        started = time.monotonic()
        result = lockd_cli(server, "run", "nightly", "--wait", "0.5", "--", "touch", str(marker))
        assert result.returncode == EXIT_NOT_ACQUIRED
        assert time.monotonic() - started >= 0.5
    assert not marker.exists()
    assert "not acquired" in result.stderr


def test_run_signals_child_when_lock_is_lost(server: ServerProcess, tmp_path: Path) -> None:
    started, stopped = tmp_path / "started", tmp_path / "stopped"
    script = (f"trap 'touch {stopped}; exit 0' TERM; touch {started}; "
              "while true; do sleep 0.05; done")  # fmt: skip
    env = {**os.environ, "LOCKD_URL": server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockd.cli", "run", "nightly", "--ttl", "0.6", "--grace", "5",
         "--", "sh", "-c", script], env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with lockd.Client(server.url) as client:
            evicted = client.force_release("nightly")
        assert len(evicted) == 1
        code = proc.wait(timeout=20)
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert code == EXIT_LOCK_LOST, stderr
    assert stopped.exists()  # the child got SIGTERM
    assert "lost" in stderr


def test_run_kills_child_that_ignores_sigterm(server: ServerProcess, tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = f"trap '' TERM; touch {started}; while true; do sleep 0.05; done"
    env = {**os.environ, "LOCKD_URL": server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockd.cli", "run", "job", "--ttl", "0.6", "--grace", "0.5",
         "--", "sh", "-c", script], env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with lockd.Client(server.url) as client:
            client.force_release("job")
        assert proc.wait(timeout=20) == EXIT_LOCK_LOST
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_acquire_status_release_force_release(server: ServerProcess) -> None:
    result = lockd_cli(server, "acquire", "deploy", "--ttl", "30", "--owner", "ci-42")
    assert result.returncode == 0, result.stderr
    grant = json.loads(result.stdout)
    assert grant["owner"] == "ci-42" and grant["token"] >= 1

    status = lockd_cli(server, "status", "--json")
    rows = json.loads(status.stdout)
    assert [(r["name"], r["holders"][0]["owner"]) for r in rows] == [("deploy", "ci-42")]
    table = lockd_cli(server, "status")
    assert "deploy" in table.stdout and "ci-42" in table.stdout

    busy = lockd_cli(server, "acquire", "deploy", "--owner", "other")
    assert busy.returncode == EXIT_NOT_ACQUIRED

    stranger = lockd_cli(server, "release", "deploy", "--owner", "other")
    assert stranger.returncode == 1 and "does not hold" in stranger.stderr

    assert lockd_cli(server, "release", "deploy", "--owner", "ci-42").returncode == 0
    assert json.loads(lockd_cli(server, "status", "--json").stdout) == []

    lockd_cli(server, "acquire", "deploy", "--owner", "ci-43")
    forced = json.loads(lockd_cli(server, "force-release", "deploy").stdout)
    assert [h["owner"] for h in forced["revoked"]] == ["ci-43"]


def test_store_option_uses_a_store_directly(tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'direct'}"
    result = subprocess.run(
        [sys.executable, "-m", "lockd.cli", "--store", store, "run", "job", "--", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with lockd.Client(store) as client:
        assert client.inspect("job").last_token == 1
