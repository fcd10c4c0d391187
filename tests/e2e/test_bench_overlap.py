"""`kvtier bench overlap` end to end: the benchmark's own command, through the servers it
starts (`kvtier serve`).

Apart from the other engine tests so that the test processes share them out.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")


def test_bench_overlap_loads_from_disk_in_the_background_while_a_stream_decodes() -> None:
    kvtier = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"
    proc = subprocess.run(
        [
            kvtier,
            "bench",
            "overlap",
            "--tokens",
            "1200",
            "--tiers",
            "disk",
            "--modes",
            "auto",
            "--repeat",
            "1",
            "--warm-tokens",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, _why(proc.stderr)
    result = json.loads(proc.stdout)
    (row,) = result["rows"]
    assert (row["tier"], row["mode"]) == ("disk", "auto")
    assert row["background"], result  # a stream was decoding: the load ran beside it
    assert row["recomputed_tokens"] == 1200 - 1184  # chunks, then a tail to 16 tokens
    assert row["load_ms"] > 0 and row["ttft_s"] > 0
    assert row["itl_before_p50_ms"] > 0 and row["gaps_during"] >= 1
    assert result["layers"] == 30  # SmolLM2-135M


def _why(stderr: str) -> str:
    """A failed run's cause: where the engine reported its fatal error, else the first
    traceback (a dead engine's stderr ends with its shutdown, thousands of characters after
    it), then the end."""
    at = stderr.find("fatal error")
    at = at if at >= 0 else stderr.find("Traceback")
    head = stderr[at : at + 4000] if at >= 0 else ""
    return f"{head}\n...\n{stderr[-2000:]}"
