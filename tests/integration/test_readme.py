"""The README's Python example runs as written (against a temporary disk tier)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.cli.main import main

from paths import README


def test_readme_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    assert text.index("make serve") < text.index("make test") < text.index("```python")
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "open_store" in b)
    env = {**os.environ, "KVTIER_DISK_PATH": str(tmp_path / "chunks")}
    env.pop("KVTIER_CONFIG", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert out.splitlines()[0] == "768 ['memory', 'memory', 'memory']"
    assert len(list((tmp_path / "chunks").rglob("*.kvc"))) == 3  # written through on close


def test_every_command_line_synopsis_names_real_commands_and_options() -> None:
    text = README.read_text()
    block = text.split("## Command line", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines: list[str] = []
    for line in block.splitlines():  # continuation lines (indented) belong to the one above
        if line.startswith(" ") and lines:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.split("#", 1)[0])
    assert len(lines) >= 9
    for line in lines:
        words = line.split()
        assert words[0] == "kvtier", line
        command = [w for w in words[1:3] if re.fullmatch(r"[a-z][a-z-]*", w)]
        # In this process: a dozen `kvtier ... --help` processes would spend half a minute
        # importing (tests/integration/test_cli.py runs the command itself).
        helped = io.StringIO()
        with contextlib.redirect_stdout(helped), pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0, line
        for option in re.findall(r"--[a-z][a-z-]*", line):
            assert option in helped.getvalue(), f"README: {line.strip()!r}: no {option} in --help"
