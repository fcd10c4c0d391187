"""kvtier inside real vLLM (CPU build), on the real SmolLM2-135M, with a real redis-server.

Each engine runs in its own process (tests/vllm_worker.py), as a served engine would, forked
from one process that imported vLLM once (tests/zygote.py); the engines compute in float32 so
that "identical output" is exact. `kvtier serve` over HTTP: tests/e2e/test_serve.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kvtier.redis_process import RedisServer

import zygote
from paths import TESTS

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

WORKER = str(TESTS / "vllm_worker.py")
MARK = "KVTIER-RESULT "
CHUNK = 128  # kvtier's chunk, here one vLLM block: short prompts still span several chunks
# 7 whole chunks and a tail
PROMPT: dict[str, Any] = {"seed": 7, "tokens": 7 * CHUNK + 8, "max_tokens": 4}


def tiers(*specs: dict[str, Any], chunk: int = CHUNK) -> dict[str, Any]:
    return {"chunk_tokens": chunk, "tiers": [{"kind": "memory", "capacity": "1GiB"}, *specs]}


def disk(path: Path) -> dict[str, Any]:
    return {"kind": "disk", "path": str(path), "capacity": "4GiB"}


@pytest.fixture(scope="module", autouse=True)
def engine_zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Worker runs of this module fork from one process that has imported vLLM."""
    path = str(tmp_path_factory.mktemp("zygote") / "socket")
    with zygote.running([sys.executable, WORKER, "--zygote", path], path, timeout_s=300):
        os.environ[zygote.ENV] = path
        try:
            yield
        finally:
            del os.environ[zygote.ENV]


def run_worker(
    config: dict[str, Any] | None,
    plan: list[dict[str, Any]],
    *options: str,
    log: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The results of a worker process running ``plan``; its stderr goes to ``log``."""
    proc = subprocess.run(
        [sys.executable, WORKER, json.dumps(config), json.dumps(plan), *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if log is not None:
        log.append(proc.stderr)
    return [
        json.loads(line[len(MARK) :]) for line in proc.stdout.splitlines() if line.startswith(MARK)
    ]


@contextmanager
def interactive_worker(
    config: dict[str, Any], plan: list[dict[str, Any]]
) -> Iterator[tuple[subprocess.Popen[str], list[dict[str, Any]]]]:
    proc = subprocess.Popen(
        [sys.executable, WORKER, json.dumps(config), json.dumps(plan)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    results: list[dict[str, Any]] = []
    try:
        yield proc, results
    finally:
        proc.kill()
        proc.wait()


def read_until_pause(proc: subprocess.Popen[str], results: list[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(MARK):
            item = json.loads(line[len(MARK) :])
            if "pause" in item:
                return
            results.append(item)
    raise AssertionError(f"worker ended early with status {proc.wait()}")


def test_a_hit_gives_identical_output_a_new_process_loads_from_disk_and_corruption_recomputes(
    tmp_path: Path,
) -> None:
    # (That vLLM alone computes the same tokens: test_kvtier_recomputes_no_more_than_vllms...)
    config = tiers(disk(tmp_path / "chunks"))
    first, again = run_worker(config, [PROMPT, PROMPT])
    assert first["stats"]["hit_tokens"] == 0
    assert again["stats"]["hit_tokens"] == 7 * CHUNK  # the second request hit every chunk
    assert again["tokens"] == first["tokens"]
    files = sorted((tmp_path / "chunks").rglob("*.kvc"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 7
    (fresh,) = run_worker(config, [PROMPT])  # a new engine process: DRAM is empty
    assert fresh["tokens"] == first["tokens"]
    # Prefetched from disk into DRAM when the request arrived, then loaded from DRAM.
    assert fresh["stats"]["tiers"]["disk"]["hits"] == 7
    assert fresh["stats"]["hit_tokens"] == 7 * CHUNK
    # A chunk damaged on disk is detected, deleted and recomputed: same output.
    raw = bytearray(files[3].read_bytes())
    raw[len(raw) // 2] ^= 0x10
    files[3].write_bytes(bytes(raw))
    (second,) = run_worker(config, [PROMPT])
    assert second["tokens"] == first["tokens"]
    assert second["stats"]["tiers"]["disk"]["corruptions"] == 1


def test_kvtier_recomputes_no_more_than_vllms_own_prefix_cache_at_any_length(
    tmp_path: Path,
) -> None:
    # Lengths that are and are not multiples of vLLM's 128-token block and kvtier's 256-token
    # chunk; the last prompt grows the first past its stored tail (a next turn of a chat).
    lengths = [(1, 340), (2, 256), (3, 384), (4, 600), (5, 300)]
    plan = [{"seed": s, "tokens": n, "max_tokens": 2} for s, n in lengths for _ in (0, 1)]
    plan.append({"seed": 1, "tokens": 440, "max_tokens": 2})
    vllm_alone = run_worker(None, plan, "prefix-caching")
    kvtier = run_worker(tiers(disk(tmp_path / "chunks"), chunk=256), plan)  # vLLM's cache off
    reused = [
        (step["tokens"], v["cached"], k["cached"])
        for step, v, k in zip(plan, vllm_alone, kvtier, strict=True)
    ]
    assert [v for _, v, _ in reused] == [0, 256, 0, 128, 0, 256, 0, 512, 0, 256, 256], reused
    # kvtier's tails end on 16 tokens, not on a 128-token block: it leaves 1-16 tokens to
    # compute where vLLM leaves up to 128 (the last: 440 tokens after a 340-token turn).
    assert [k for _, _, k in reused] == [0, 336, 0, 240, 0, 368, 0, 592, 0, 288, 336], reused
    assert [r["tokens"] for r in kvtier] == [r["tokens"] for r in vllm_alone]


def test_a_second_process_loads_from_redis(redis_server: RedisServer, prefix: str) -> None:
    config = tiers({"kind": "redis", "url": redis_server.url, "prefix": prefix})
    (first,) = run_worker(config, [PROMPT])
    (second,) = run_worker(config, [PROMPT])
    assert second["tokens"] == first["tokens"]
    assert second["stats"]["tiers"]["redis"]["hits"] == 7  # read once (prefetch), not twice


def test_requests_succeed_when_redis_stops_and_the_disk_refuses_writes(
    tmp_path: Path, prefix: str
) -> None:
    server = RedisServer().start()
    chunks = tmp_path / "chunks"
    config = tiers(
        disk(chunks), {"kind": "redis", "url": server.url, "prefix": prefix, "timeout_s": 0.5}
    )
    other = {"seed": 8, "tokens": 550, "max_tokens": 4}
    plan = [PROMPT, {"pause": "break the tiers"}, other, PROMPT, other]
    try:
        with interactive_worker(config, plan) as (proc, results):
            read_until_pause(proc, results)
            server.stop()
            subprocess.run(["chattr", "+i", str(chunks / ".tmp")], check=False)
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.wait(timeout=600) == 0
            assert proc.stdout is not None
            results += [
                json.loads(line[len(MARK) :])
                for line in proc.stdout.read().splitlines()
                if line.startswith(MARK)
            ]
    finally:
        subprocess.run(["chattr", "-i", str(chunks / ".tmp")], check=False)
        server.close()
    first, other_a, again, other_b = results
    assert again["tokens"] == first["tokens"]  # served from DRAM
    assert other_b["tokens"] == other_a["tokens"]
    assert other_b["stats"]["tiers"]["redis"]["errors"] >= 1


def test_background_loads_give_identical_output_and_recompute_what_fails(tmp_path: Path) -> None:
    config = {**tiers(disk(tmp_path / "chunks")), "loads": "async"}
    (first,) = run_worker(config, [PROMPT])
    # In the order they were written, one writer thread taking the chunks in prompt order
    # (a read refreshes a file's mtime, and background loads read in no fixed order).
    files = sorted((tmp_path / "chunks").rglob("*.kvc"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 7
    log: list[str] = []
    (again,) = run_worker(config, [PROMPT], log=log)  # DRAM is empty: from disk
    loaded_all = f"loaded {7 * CHUNK} tokens (7 chunks from disk) in the background"
    assert loaded_all in log[0], log[0][-3000:]
    assert again["tokens"] == first["tokens"]
    assert again["cached"] == 7 * CHUNK
    raw = bytearray(files[3].read_bytes())  # the fourth chunk of the prompt
    raw[len(raw) // 2] ^= 0x10
    files[3].write_bytes(bytes(raw))
    (damaged,) = run_worker(config, [PROMPT], log=log)
    assert damaged["stats"]["tiers"]["disk"]["corruptions"] == 1
    # The load stopped at the damaged chunk; vLLM computed the blocks reported failed.
    loaded = re.search(r"loaded (\d+) tokens \((\d+) chunks from disk\) in the background", log[1])
    assert loaded, log[1][-3000:]
    assert int(loaded[1]) == CHUNK * int(loaded[2]) < 7 * CHUNK
    assert damaged["tokens"] == first["tokens"]


def test_a_request_abandoned_during_its_background_load_leaves_the_next_intact(
    tmp_path: Path,
) -> None:
    # The cache has room for the prompt and one block more: the next request gets the blocks
    # the abandoned one frees, and they must stay its own until its load has ended.
    config = {**tiers(disk(tmp_path / "chunks")), "loads": "async"}
    other: dict[str, Any] = {"seed": 8, "tokens": 300, "max_tokens": 16}
    _, expected = run_worker(config, [PROMPT, other])  # PROMPT's chunks reach the disk
    blocks = -(-(PROMPT["tokens"] + PROMPT["max_tokens"]) // 128) + 1
    log: list[str] = []
    plan = [{"abandon": PROMPT}, {**other, "salt": "fresh"}]  # a salt of its own: computed
    abandoned, after = run_worker(config, plan, f"gpu-blocks={blocks}", log=log)
    assert abandoned["abandoned"]
    loading = r"request abandon-0\S*: loaded \d+ tokens \(\d+ chunks from disk\) in the background"
    assert re.search(loading, log[0]), log[0][-3000:]
    assert after["cached"] == 0
    assert after["tokens"] == expected["tokens"]


def test_cache_salts_never_share_chunks(tmp_path: Path) -> None:
    config = tiers(disk(tmp_path / "chunks"))
    steps = [{**PROMPT, "salt": salt} for salt in ("tenant-a", "tenant-b", "tenant-a", None)]
    a, b, a_again, unsalted = run_worker(config, steps)
    hits = [r["stats"]["hit_tokens"] for r in (a, b, a_again, unsalted)]
    assert hits == [0, 0, 7 * CHUNK, 7 * CHUNK]  # b and unsalted add no hits; a again hits all
    assert a["tokens"] == b["tokens"] == a_again["tokens"] == unsalted["tokens"]


def test_a_bad_kvtier_option_fails_at_start_with_a_clear_error() -> None:
    bad = {"tiers": [{"kind": "memory", "capacity": "lots"}]}
    proc = subprocess.run(
        [sys.executable, WORKER, json.dumps(bad), "[]"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    assert "kv_connector_extra_config: tiers[0].capacity: expected a size" in proc.stderr
