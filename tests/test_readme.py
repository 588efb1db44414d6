"""The curl examples in README.md work exactly as printed (against a real server)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

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
