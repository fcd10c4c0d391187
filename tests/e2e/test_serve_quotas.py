"""Quotas through `kvtier serve --tenants FILE`, the real server over HTTP: one tenant floods
the DRAM tier while another repeats its prompts; the victim keeps every hit it had alone, the
flood churns through its own share (its evictions, in /metrics), and each tenant's part of
the tier is in /metrics.

vLLM's own prefix cache is off here (``--no-enable-prefix-caching``): it is not divided among
tenants, and with it on the victim's repeats would hit there, not in kvtier's tier. The same
flood without quotas takes the victim's chunks (tests/integration/test_quotas.py shows it on
the store, where it runs in a second).
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command
from kvtier.tenants import hash_key, new_key, new_secret

from pods import wait_for

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

VICTIM, FLOOD = new_key(), new_key()
# The demo model's KV in float32: 45 KiB a token (30 layers, 3 KV heads of 64), so a
# 256-token chunk is 11.25 MiB.
CHUNK_BYTES = 256 * 45 * 1024


def text(topic: str, lines: int) -> str:
    return " ".join(f"Line {i} of the {topic} notes, kept apart." for i in range(lines))


def metrics(server: Server) -> dict[tuple[str, str, str], float]:
    """kvtier:tenant_tier_* samples, by (series, tenant, tier)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        page = r.read().decode()
    found: dict[tuple[str, str, str], float] = {}
    pattern = r'^kvtier:tenant_tier_(\w+)\{[^}]*tenant="([^"]+)",tier="([^"]+)"[^}]*\} (\S+)$'
    for m in re.finditer(pattern, page, re.M):
        found[(m[1], m[2], m[3])] = found.get((m[1], m[2], m[3]), 0.0) + float(m[4])
    return found


def test_a_flood_from_one_tenant_leaves_the_others_hits(tmp_path: Path) -> None:
    (tmp_path / "salts.secret").write_text(new_secret())
    (tmp_path / "tenants.yaml").write_text(
        "secret_file: salts.secret\nanonymous: refuse\ntenants:\n"
        f"  - name: victim\n    keys: ['{hash_key(VICTIM)}']\n"
        f"  - name: flood\n    keys: ['{hash_key(FLOOD)}']\n"
    )
    port = free_port()
    # DRAM for 8 chunks: each tenant's share is 4; the victim's two ~410-token prompts take
    # 2 chunks and 2 tails (34 MiB), a round of the flood (three ~820-token prompts) 9 and
    # their tails (LRU alone would evict the victim).
    options = ["--disk", "none", "--dram", "90MiB"]
    options += ["--tenants", str(tmp_path / "tenants.yaml")]
    vllm = ["--max-model-len", "2048", "--dtype", "float32", "--no-enable-prefix-caching"]
    command = kvtier_serve_command(port, *options, *vllm)
    victim_prompts = [text(f"victim {n}", 30) for n in range(2)]
    with Server(command, port, tmp_path / "serve.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as s:

        def victim_round() -> list[int]:
            cached = []
            for prompt in victim_prompts:
                done = s.complete(prompt, max_tokens=1, api_key=VICTIM)
                assert done.prompt_tokens > 256 and done.cached_tokens is not None
                cached.append(done.cached_tokens)
            return cached

        assert victim_round() == [0, 0]  # stored
        alone = victim_round()
        assert all(c >= 256 for c in alone), f"alone, the victim's repeats hit: {alone}"
        flooded = []
        for r in range(2):
            for n in range(3):
                done = s.complete(text(f"flood {r}-{n}", 60), max_tokens=1, api_key=FLOOD)
                assert done.prompt_tokens > 512
            flooded += victim_round()
        hits_alone = sum(c >= 256 for c in alone) / len(alone)
        hits_flooded = sum(c >= 256 for c in flooded) / len(flooded)
        assert hits_flooded >= hits_alone - 0.05, f"flooded, the victim's hits: {flooded}"

        def evictions() -> tuple[float, float]:
            m = metrics(s)
            return m.get(("evictions_total", "flood", "memory"), 0.0), m.get(
                ("evictions_total", "victim", "memory"), 0.0
            )

        wait_for(lambda: evictions()[0] > 0, 30, "the flood's evictions in /metrics")
        m = metrics(s)
        assert evictions()[1] == 0  # the flood churned its own share
        assert m[("used_bytes", "victim", "memory")] >= 2 * CHUNK_BYTES
        assert m[("share_bytes", "victim", "memory")] == m[("share_bytes", "flood", "memory")]
