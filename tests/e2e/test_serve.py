"""`kvtier serve` over HTTP, as users run it: a restart that reads from disk.

The benchmarks that start servers have files of their own (test_bench_ttft.py,
test_bench_overlap.py), so that the test processes share them out.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from serving import serve

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")


def metric_values(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text -> {(name, tier label or ""): value}, summed over other labels."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = re.match(r"^(kvtier:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            tier = re.search(r'tier="([^"]*)"', match.group(2) or "")
            key = (match.group(1), tier.group(1) if tier else "")
            out[key] = out.get(key, 0.0) + float(match.group(3))
    return out


def test_kvtier_serve_after_a_restart_serves_a_long_prompt_from_disk(tmp_path: Path) -> None:
    chunks = tmp_path / "chunks"
    prompt = " ".join(f"The {i}th line of a long shared document." for i in range(100))
    other = " ".join(f"Another text, sentence {i}." for i in range(50))
    with serve(chunks, tmp_path / "first.log") as server:
        first = server.complete(prompt, max_tokens=4)
    assert first.prompt_tokens > 1100  # 1,190: 9 blocks and a tail, 5 chunks (the last partial)
    # Stopped with SIGTERM, as a service manager stops it: every chunk reached the disk.
    with serve(chunks, tmp_path / "second.log") as server:
        second = server.complete(prompt, max_tokens=4)
        server.complete("A new text: " + other, max_tokens=1)  # computed, then saved
        log = server.tail(1 << 20)
        # vLLM's own /metrics shows kvtier's series: the disk hit and the prefill time it
        # saved, priced at the rate this engine measured before its restart.
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
                metrics = metric_values(r.read().decode())
            loaded = metrics.get(("kvtier:tier_loaded_tokens_total", "disk"), 0)
            saved = metrics.get(("kvtier:save_seconds_count", ""), 0)
            if (loaded and saved) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # Idle, /metrics shows what the tiers hold now (read from the worker as it is
        # rendered), not what the last step's report said. The last prompt's chunks may
        # still be on their way to disk: compared once the states hold still around it.
        deadline = time.monotonic() + 15
        while True:
            before = _states(server.url)
            with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
                idle = metric_values(r.read().decode())
            states = _states(server.url)
            if states["tiers"] == before["tiers"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert "from disk" in log, log[-3000:]
    assert "in the background" not in log  # no other request to stall: loaded before the step
    assert second.text == first.text
    # Its tail, stored to 16 tokens (1,184 of 1,190), not to vLLM's 128-token blocks (1,152).
    assert second.cached_tokens == (second.prompt_tokens - 1) // 16 * 16
    assert loaded == second.cached_tokens, metrics
    assert metrics[("kvtier:prefill_seconds_saved_total", "")] > 0, metrics
    assert metrics[("kvtier:hit_tokens_total", "")] == second.cached_tokens
    assert metrics[("kvtier:tier_bytes_read_total", "disk")] > 0
    assert metrics[("kvtier:tier_up", "disk")] == 1 and metrics[("kvtier:tier_chunks", "disk")] > 0
    disk = states["tiers"]["disk"]
    assert idle[("kvtier:tier_used_bytes", "disk")] == disk["used_bytes"] > 0, states
    assert idle[("kvtier:tier_chunks", "disk")] == disk["chunks"]
    assert metrics[("kvtier:load_seconds_count", "")] >= 1
    assert saved >= 1, metrics
    # One line per request says where its tokens came from.
    lines = [json.loads(m) for m in re.findall(r"kvtier request (\{.*\})", log)]
    line = next(x for x in lines if x["prompt_tokens"] == second.prompt_tokens)
    assert line["loaded_tokens"] == {"disk": second.cached_tokens}, line
    assert line["kvtier_hit_tokens"] == second.cached_tokens and line["reported"]
    assert line["recomputed_tokens"] == second.prompt_tokens - second.cached_tokens
    assert line["load_s"] > 0 and line["failed_tokens"] == 0
    # A request abandoned during its background load: tests/e2e/test_vllm.py.


def _states(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/kvtier/states", timeout=10) as r:
        return dict(json.loads(r.read()))
