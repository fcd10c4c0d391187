"""`kvtier serve` over HTTP, as users run it: a restart that reads from disk, and the
benchmarks' own commands (`kvtier bench ttft`, `kvtier bench overlap`), end to end.

Each test starts its own servers, so the tests run in parallel with each other.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvtier.cli.server import Server, kvtier_serve_command
from kvtier.redis_process import free_port

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")


def serve(chunks: Path, log: Path, *options: str) -> Server:
    port = free_port()
    command = kvtier_serve_command(
        port, "--disk", str(chunks), "--dram", "512MiB", "--max-model-len", "4096",
        "--no-enable-prefix-caching", "--dtype", "float32", "--enable-prompt-tokens-details",
        *options,
    )  # fmt: skip
    return Server(command, port, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})


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
    prompt = " ".join(f"The {i}th line of a long shared document." for i in range(170))
    other = " ".join(f"Another text, sentence {i}." for i in range(50))
    with serve(chunks, tmp_path / "first.log") as server:
        first = server.complete(prompt, max_tokens=4)
        expected = server.complete(other, max_tokens=16).text
    assert first.prompt_tokens > 2000  # 2,100: 16 blocks and a tail
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
    assert "from disk" in log, log[-3000:]
    assert "in the background" not in log  # no other request to stall: loaded before the step
    assert second.text == first.text
    assert second.cached_tokens == (second.prompt_tokens - 1) // 128 * 128
    assert loaded == second.cached_tokens, metrics
    assert metrics[("kvtier:prefill_seconds_saved_total", "")] > 0, metrics
    assert metrics[("kvtier:hit_tokens_total", "")] == second.cached_tokens
    assert metrics[("kvtier:tier_bytes_read_total", "disk")] > 0
    assert metrics[("kvtier:tier_up", "disk")] == 1 and metrics[("kvtier:tier_chunks", "disk")] > 0
    assert metrics[("kvtier:load_seconds_count", "")] >= 1
    assert saved >= 1, metrics
    # One line per request says where its tokens came from.
    lines = [json.loads(m) for m in re.findall(r"kvtier request (\{.*\})", log)]
    line = next(x for x in lines if x["prompt_tokens"] == second.prompt_tokens)
    assert line["loaded_tokens"] == {"disk": second.cached_tokens}, line
    assert line["kvtier_hit_tokens"] == second.cached_tokens and line["reported"]
    assert line["recomputed_tokens"] == second.prompt_tokens - second.cached_tokens
    assert line["load_s"] > 0 and line["failed_tokens"] == 0

    # A request abandoned during its background load leaves the next request intact. The
    # cache has room for the long prompt and little more: the next request gets the blocks
    # it frees, and they must stay its own until the load ends.
    blocks = -(-(first.prompt_tokens + 8) // 128)
    small = ("--num-gpu-blocks-override", str(blocks + 1), "--max-model-len", str(128 * blocks))
    logged = ("--enable-log-requests",)  # "Added request": the engine has it
    with serve(chunks, tmp_path / "third.log", "--loads", "async", *small, *logged) as server:
        request = server._request(prompt, 8)
        client = http.client.HTTPConnection("127.0.0.1", server.port)
        client.request("POST", request.selector, request.data, dict(request.header_items()))
        deadline = time.monotonic() + 30  # a loaded machine takes a while to hand it over
        while "Added request" not in server.tail(1 << 16) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        client.close()  # the client gives up while the prompt loads: vLLM aborts it
        # Another prompt, computed at once (a salt of its own: a miss).
        reply = server.complete(other, max_tokens=16, cache_salt="fresh")
        log = server.tail(1 << 20)
    assert "in the background" in log, log[-3000:]
    assert reply.cached_tokens == 0
    assert reply.text == expected


def test_bench_ttft_prints_its_rows_through_kvtier_serve() -> None:
    kvtier = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"
    proc = subprocess.run(
        [kvtier, "bench", "ttft", "--tokens", "700", "--tiers", "disk", "--no-example",
         "--no-overhead", "--repeat", "1", "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    paths = {row["path"]: row for row in result["rows"]}
    assert set(paths) == {"cold_vllm", "cold", "vllm_prefix", "kvtier_disk"}, result
    assert all(row["ttft_s"] and row["ttft_s"] > 0 for row in paths.values()), result
    # 700 tokens: vLLM computes at least the last one; whole 128-token blocks are reused.
    assert paths["cold"]["recomputed_tokens"] == 700
    assert paths["vllm_prefix"]["recomputed_tokens"] == 700 - 640
    assert paths["kvtier_disk"]["recomputed_tokens"] == 700 - 640  # chunks and a tail
    # A hit is a hit: loading 700 tokens' KV from disk takes a fraction of computing them.
    assert paths["kvtier_disk"]["ttft_s"] < 0.7 * paths["cold"]["ttft_s"], result
    # Every server computed on the same cores (plain vLLM would keep one for its scheduler).
    assert len({str(cores) for cores in result["cores"].values()}) == 1, result["cores"]
    assert result["raw"]["700"]["disk_cold_read_s"] > 0


def test_bench_overlap_loads_from_disk_in_the_background_while_a_stream_decodes() -> None:
    kvtier = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"
    proc = subprocess.run(
        [kvtier, "bench", "overlap", "--tokens", "1200", "--tiers", "disk", "--modes", "auto",
         "--repeat", "1", "--warm-tokens", "5", "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    (row,) = result["rows"]
    assert (row["tier"], row["mode"]) == ("disk", "auto")
    assert row["background"], result  # a stream was decoding: the load ran beside it
    assert row["recomputed_tokens"] == 1200 - 1152  # whole 128-token blocks were loaded
    assert row["load_ms"] > 0 and row["ttft_s"] > 0
    assert row["itl_before_p50_ms"] > 0 and row["gaps_during"] >= 1
    assert result["layers"] == 30  # SmolLM2-135M
