"""The README's examples work exactly as printed: the curl lines against a real server,
the Python example against a file store."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lockd
from tests.serverproc import running_server

README = Path(__file__).parent.parent / "README.md"


def curl_examples() -> list[tuple[str, str | None]]:
    """(command, expected error code or None) for each curl line of the README."""
    text = README.read_text().replace("\\\n", " ")
    examples: list[tuple[str, str | None]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("curl "):
            continue
        command = re.sub(r"\s+#\s.*$", "", line).strip()
        following = lines[i + 1] if i + 1 < len(lines) else ""
        expected = re.search(r'# \{"error":"(\w+)"', following)
        examples.append((command, expected.group(1) if expected else None))
    return examples


def json_values(output: str) -> list[Any]:
    decoder, values, pos = json.JSONDecoder(), [], 0
    while pos < len(output):
        value, pos = decoder.raw_decode(output, pos)
        values.append(value)
        while pos < len(output) and output[pos].isspace():
            pos += 1
    return values


def test_readme_curl_examples_work_as_printed() -> None:
    examples = curl_examples()
    assert len(examples) >= 8
    with running_server("memory://") as server:
        port = server.url.rsplit(":", 1)[1]
        for command, expected_error in examples:
            run = command.replace("localhost:7700", f"localhost:{port}")
            result = subprocess.run(["bash", "-c", run], capture_output=True, text=True,
                                    timeout=30, check=False)  # fmt: skip
            assert result.returncode == 0, (command, result.stderr)
            values = json_values(result.stdout)
            assert values, command
            errors = [v.get("error") for v in values]
            assert errors == [expected_error] * len(values), (command, result.stdout)


def python_example() -> str:
    """The first Python block of the README (the "Ten lines" example)."""
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match is not None
    return match.group(1)


def run_example(tmp: Path, charge: Callable[..., None]) -> list[str]:
    alerts: list[str] = []
    code = compile(python_example(), "README.md", "exec")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        exec(code, {"charge": charge, "alert": alerts.append})
    finally:
        os.chdir(cwd)
    return alerts


def test_readme_python_example_runs_as_printed(tmp_path: Path) -> None:
    fences: list[int] = []
    assert run_example(tmp_path, lambda order, fence: fences.append(fence)) == []
    assert len(fences) == 1 and fences[0] > 0


def test_readme_python_example_alerts_when_the_lock_is_lost(tmp_path: Path) -> None:
    def charge(order: int, fence: int) -> None:
        del order, fence
        with lockd.Client("file://./lockd-data") as admin:  # someone evicts the holder
            assert [h.token for h in admin.force_release("order:42")] != []

    alerts = run_example(tmp_path, charge)
    assert alerts == ["order:42 was lost while charging: check the charge"]
