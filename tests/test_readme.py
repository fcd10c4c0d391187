"""The README's Python example runs as written (against a temporary disk tier)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


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
