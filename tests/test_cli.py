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


def test_run_kills_child_at_once_when_lock_is_revoked(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A revoked hold has no lease left to give the child a grace in: SIGKILL at once."""
    started, stopped = tmp_path / "started", tmp_path / "stopped"
    script = (f"trap 'touch {stopped}; exit 0' TERM; touch {started}; "
              "while true; do sleep 0.05; done")  # fmt: skip
    env = {**os.environ, "LOCKD_URL": server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockd.cli", "run", "nightly", "--ttl", "6", "--grace", "5",
         "--", "sh", "-c", script], env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with lockd.Client(server.url) as client:
            evicted = client.force_release("nightly")
            revoked = time.monotonic()
        assert len(evicted) == 1
        code = proc.wait(timeout=20)
        took = time.monotonic() - revoked
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert code == EXIT_LOCK_LOST, stderr
    assert took < 3  # the next renewal (at ttl/3 = 2 s) finds it revoked; no 5 s grace
    assert not stopped.exists()  # SIGKILL, not SIGTERM
    assert "revoked" in stderr


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


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``lockd ARGS`` without LOCKD_URL."""
    env = {k: v for k, v in os.environ.items() if k != "LOCKD_URL"}
    return subprocess.run(
        [sys.executable, "-m", "lockd.cli", *args], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip


BAD_INPUT = [
    ["acquire", "job", "--ttl", "0"],
    ["acquire", ""],
    ["acquire", "job", "--wait", "-1"],
    ["acquire", "job", "--owner", ""],
    ["release", "", "--owner", "me"],
    ["status", "bad\nprefix"],
    ["force-release", "job", "--owner", ""],
    ["--namespace", "", "status"],
    ["run", "job", "--ttl", "0", "--", "touch", "{marker}"],
    ["run", "", "--", "touch", "{marker}"],
    ["run", "job", "--wait", "-1", "--", "touch", "{marker}"],
    ["run", "job", "--ttl", "5", "--grace", "5", "--", "touch", "{marker}"],
    ["run", "job", "--grace", "-1", "--", "touch", "{marker}"],
    ["run", "job", "--grace", "nan", "--", "touch", "{marker}"],
]


@pytest.mark.parametrize("args", BAD_INPUT, ids=" ".join)
def test_bad_input_is_a_usage_error(args: list[str], tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    marker = tmp_path / "ran"
    result = cli("--store", store, *(a.format(marker=marker) for a in args))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Error:" in result.stderr
    assert not marker.exists()
    with lockd.Client(store) as client:
        assert client.list_locks() == []


@pytest.mark.parametrize("url", ["nonsense", "http://[bad", "ftp://x", "redis://h:p", "file://"])
def test_malformed_store_url_is_a_usage_error(url: str, tmp_path: Path) -> None:
    for option in ("--server", "--store"):
        marker = tmp_path / "ran"
        result = cli(option, url, "run", "job", "--", "touch", str(marker))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "Error:" in result.stderr
        assert not marker.exists()


def test_unreachable_server_exits_69() -> None:
    from tests.serverproc import free_port

    result = cli("--server", f"http://127.0.0.1:{free_port()}", "status")
    assert result.returncode == 69, result.stderr
    assert "Traceback" not in result.stderr and "unreachable" in result.stderr


def test_release_prints_the_count_left(tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    for _ in range(2):
        assert cli("--store", store, "acquire", "deploy", "--owner", "ci").returncode == 0
    first = cli("--store", store, "release", "deploy", "--owner", "ci")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"name": "deploy", "owner": "ci", "count": 1,
                                        "released": False}  # fmt: skip
    last = cli("--store", store, "release", "deploy", "--owner", "ci")
    assert json.loads(last.stdout) == {"name": "deploy", "owner": "ci", "count": 0,
                                       "released": True}  # fmt: skip
    with lockd.Client(store) as client:
        assert client.inspect("deploy").holders == ()


@pytest.mark.parametrize(("command", "code"), [("/no/such/cmd", 127), ("{script}", 126)])
def test_run_command_that_cannot_start_releases_the_lock(
    command: str, code: int, tmp_path: Path
) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    store = f"file://{tmp_path / 'store'}"
    result = cli("--store", store, "run", "job", "--", command.format(script=script))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "cannot run" in result.stderr
    with lockd.Client(store) as client:
        info = client.inspect("job")
    assert info.holders == () and info.last_token == 1


@pytest.mark.parametrize(("signame", "code"), [("TERM", 143), ("INT", 130), ("KILL", 137)])
def test_run_child_killed_by_a_signal_exits_like_a_shell(
    signame: str, code: int, tmp_path: Path
) -> None:
    store = f"file://{tmp_path / 'store'}"
    result = cli("--store", store, "run", "job", "--", "sh", "-c", f"kill -{signame} $$")
    assert result.returncode == code, result.stderr


def test_store_and_server_options_after_the_subcommand(
    server: ServerProcess, tmp_path: Path
) -> None:
    store = f"file://{tmp_path / 'direct'}"
    result = cli("run", "job", "--store", store, "--", "true")
    assert result.returncode == 0, result.stderr
    with lockd.Client(store) as client:
        assert client.inspect("job").last_token == 1
    assert cli("acquire", "deploy", "--server", server.url, "--owner", "ci").returncode == 0
    rows = json.loads(cli("status", "--server", server.url, "--json").stdout)
    assert [r["name"] for r in rows] == ["deploy"]
    released = cli("release", "deploy", "--owner", "ci", "--server", server.url)
    assert json.loads(released.stdout)["released"] is True
    assert cli("--namespace", "ns", "acquire", "a", "--server", server.url).returncode == 0
    assert json.loads(cli("status", "--namespace", "ns", "--server", server.url,
                          "--json").stdout)[0]["name"] == "a"  # fmt: skip


def test_store_given_twice_differently_is_a_usage_error(tmp_path: Path) -> None:
    one, two = f"file://{tmp_path / 'one'}", f"file://{tmp_path / 'two'}"
    result = cli("--store", one, "run", "job", "--store", two, "--", "true")
    assert result.returncode == 2 and "Error:" in result.stderr
    both = cli("--server", "http://127.0.0.1:1", "status", "--store", one)
    assert both.returncode == 2 and "not both" in both.stderr


def test_store_option_wins_over_lockd_url(tmp_path: Path) -> None:
    from tests.serverproc import free_port

    store = f"file://{tmp_path / 'direct'}"
    env = {**os.environ, "LOCKD_URL": f"http://127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [sys.executable, "-m", "lockd.cli", "--store", store, "run", "job", "--", "true"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_run_stops_the_childs_own_children_too(server: ServerProcess, tmp_path: Path) -> None:
    from tests.test_cli_lease import dead, wait_for

    pidfile = tmp_path / "pid"
    script = f"sleep 60 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockd.cli", "--server", server.url, "run", "job", "--ttl", "0.6",
         "--", "sh", "-c", script], stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(pidfile.exists)
        grandchild = int(pidfile.read_text())
        with lockd.Client(server.url) as client:
            assert len(client.force_release("job")) == 1
        assert proc.wait(timeout=20) == EXIT_LOCK_LOST
        wait_for(lambda: dead(grandchild), timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pidfile.exists() and not dead(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), 9)
