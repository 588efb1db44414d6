"""``lockd serve``: which store it serves, and failing to start without claiming to serve."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serverproc import ServerProcess, free_port, running_server, stop_process


@contextlib.contextmanager
def serving(*args: str, cwd: Path) -> Iterator[str]:
    """``lockd ARGS --port P`` until it answers; yields its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LOCKD_URL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lockd.cli", *args, "--port", str(port), "--log-level", "warning"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        stop_process(process, 15, 15)


@pytest.mark.parametrize("where", ["before", "after"])
def test_serve_uses_the_store_given_before_or_after_the_subcommand(
    where: str, tmp_path: Path
) -> None:
    option = ["--store", "memory://served"]
    args = [*option, "serve"] if where == "before" else ["serve", *option]
    with serving(*args, cwd=tmp_path) as url:
        capabilities = httpx.get(f"{url}/v1/info").json()["capabilities"]
    assert capabilities["durable"] is False  # memory://, not a file store
    assert not (tmp_path / "lockd-data").exists()  # not the default file store


def serve_once(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``lockd serve ARGS`` that is expected to fail at once."""
    return subprocess.run(
        [sys.executable, "-m", "lockd.cli", "serve", *args, "--log-level", "warning"],
        cwd=cwd, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def assert_one_line_failure(result: subprocess.CompletedProcess[str], needle: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "serving" not in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1 and needle.lower() in output.lower(), output


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(f"file://{tmp_path / 'store'}") as s:
        yield s


def test_serve_on_a_taken_port_fails_in_one_line(server: ServerProcess, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    result = serve_once("--store", f"file://{tmp_path / 'other'}", "--port", port, cwd=tmp_path)
    assert_one_line_failure(result, "address already in use")
    assert not (tmp_path / "other").exists()  # the store was not opened
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_serve_on_a_busy_file_store_fails_in_one_line(
    server: ServerProcess, tmp_path: Path
) -> None:
    port = str(free_port())
    result = serve_once("--store", f"file://{tmp_path / 'store'}", "--port", port, cwd=tmp_path)
    assert_one_line_failure(result, "is open in process")
    assert result.returncode == 69
    with pytest.raises(httpx.ConnectError):  # nothing was left listening
        httpx.get(f"http://127.0.0.1:{port}/healthz")
