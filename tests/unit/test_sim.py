"""kvtier sim: exact hit rates on hand-made traces, the bounds, tiers, routing and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kvtier.cli.main import main
from kvtier.errors import ConfigError
from kvtier.policy import POLICY_NAMES
from kvtier.sim.bounds import belady_hits, infinite_hits
from kvtier.sim.engine import TierSpec, simulate
from kvtier.sim.synthetic import Workload, generate
from kvtier.sim.trace import Request

from paths import README, REPO, TRACES

TRACE = TRACES / "conversation_trace.jsonl"


def req(ids: list[int], tokens: int | None = None, t: float = 0.0) -> Request:
    return Request(t, tokens if tokens is not None else 512 * len(ids), 10, tuple(ids))


# Capacity 3, LRU. After r3 the cache is 2,3,4 (oldest first): r4's block 1 misses, so its
# block 2 is not reused although held (prefix semantics); r4 then writes 1 (evicting 2) and 2
# (evicting 3), and r5 hits 1,2 and writes 3 (evicting 4).
HAND = [req([1, 2]), req([1, 2, 3]), req([4]), req([1, 2]), req([1, 2, 3], tokens=1500)]


def one_tier(requests: list[Request], blocks: int, policy: str = "lru", **kw: object) -> object:
    return simulate(requests, [TierSpec("dram", blocks)], block_bytes=100, policy=policy, **kw)  # type: ignore[arg-type]


def test_lru_hand_trace_exact() -> None:
    r = simulate(HAND, [TierSpec("dram", 3)], block_bytes=100)
    assert (r.blocks, r.hit_blocks) == (11, 4)  # r2: 1,2 and r5: 1,2
    assert r.hit_rate_blocks == pytest.approx(4 / 11)
    assert r.hit_tokens == 2048 and r.tokens == 1024 + 1536 + 512 + 1024 + 1500
    assert r.tiers[0].evictions == 4  # r3 drops 1, r4 drops 2 then 3, r5 drops 4
    assert r.tiers[0].read_bytes == 400 and r.tiers[0].written_bytes == 700
    # Bounds: infinite sees r2 (2), r4 (2), r5 (3); Belady keeps 1,2,3 and skips 4 (never
    # used again), so at 3 blocks it reaches the infinite cache here.
    assert infinite_hits(HAND) == (7, 1024 + 1024 + 1500)
    assert belady_hits(HAND, 3) == (7, 1024 + 1024 + 1500)
    assert r.infinite_hit_rate_blocks == r.belady_hit_rate_blocks == pytest.approx(7 / 11)


def test_belady_at_two_blocks_hand_computed() -> None:
    # Room for two: 1 and 2 are needed again soonest; 3 (used last, in r5) is not admitted
    # in r2 because both held blocks are needed before it; r5 then hits 1,2 but not 3.
    assert belady_hits(HAND, 2) == (6, 1024 + 1024 + 1024)


def test_lru_order_follows_the_requests_blocks() -> None:
    # After [1,2,3] the last block is the most recent: a new block evicts 1, which breaks the
    # prefix of the next [1,2,3] entirely.
    trace = [req([1, 2, 3]), req([9]), req([1, 2, 3])]
    assert simulate(trace, [TierSpec("dram", 3)], block_bytes=1).hit_blocks == 0
    assert simulate(trace, [TierSpec("dram", 4)], block_bytes=1).hit_blocks == 3


def test_two_tiers_count_hits_where_served_and_promote() -> None:
    trace = [req([1, 2]), req([1, 2])]
    r = simulate(trace, [TierSpec("dram", 1), TierSpec("ssd", 4)], block_bytes=10)
    dram, ssd = r.tiers
    assert r.hit_blocks == 2
    assert (dram.hit_blocks, ssd.hit_blocks) == (1, 1)  # 2 from DRAM, 1 from the SSD
    assert ssd.written_bytes == 20  # written through once
    assert dram.written_bytes == 40  # r1: 1, 2; r2: 1 and 2 promoted back in turn
    assert ssd.read_bytes == 10 and dram.read_bytes == 10


def test_cache_aware_routing_follows_the_prefix() -> None:
    trace = [req([1]), req([1, 2]), req([1, 2, 3])]
    tiers = [TierSpec("dram", 10)]
    rr = simulate(trace, tiers, block_bytes=1, nodes=2, routing="round-robin")
    aware = simulate(trace, tiers, block_bytes=1, nodes=2, routing="cache-aware")
    assert rr.hit_blocks == 1  # r2 lands on the empty node; r3 finds only block 1
    assert aware.hit_blocks == 3
    shared = simulate(
        trace, [TierSpec("shared", 10, shared=True)], block_bytes=1, nodes=2, routing="round-robin"
    )
    assert shared.hit_blocks == 3  # a shared tier makes routing irrelevant for hits


def test_cache_aware_routing_keeps_conversations_together_without_piling_up() -> None:
    # Every conversation shares the system prompt: routing on the prefix alone would send all
    # of them to one node; with the load ceiling they spread, and follow-ups find their node.
    trace = generate(Workload(kind="chat", users=400, turns=4, think_s=120, window_s=1800))
    tiers = [TierSpec("dram", 100)]
    hits = {
        routing: simulate(trace, tiers, block_bytes=1, nodes=4, routing=routing, bounds=False)
        for routing in ("cache-aware", "random", "round-robin")
    }
    # (seeded: 0.671 against 0.597, 0.590, and 0.608 for one node of the same size)
    assert hits["cache-aware"].hit_rate_blocks > hits["random"].hit_rate_blocks + 0.05
    assert hits["cache-aware"].hit_rate_blocks > hits["round-robin"].hit_rate_blocks + 0.05
    one_node = simulate(trace, tiers, block_bytes=1, bounds=False)
    assert hits["cache-aware"].hit_rate_blocks > one_node.hit_rate_blocks + 0.03


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("nodes", [1, 3])
def test_bounds_hold_on_generated_workloads(policy: str, nodes: int) -> None:
    w = Workload(kind="mixed", users=30, turns=4, docs=20, rag_requests=80, doc_tokens=1536)
    trace = generate(w)
    for blocks in (4, 16, 64, 256):
        r = simulate(
            trace,
            [TierSpec("dram", blocks)],
            block_bytes=1,
            policy=policy,
            nodes=nodes,
            routing="random",
        )
        assert r.belady_hit_rate_blocks is not None and r.infinite_hit_rate_blocks is not None
        assert r.hit_rate_blocks <= r.belady_hit_rate_blocks + 1e-12
        assert r.belady_hit_rate_blocks <= r.infinite_hit_rate_blocks + 1e-12
    assert r.hit_rate_blocks > 0


def test_synthetic_chat_shares_history_and_system_prompt() -> None:
    one = generate(Workload(kind="chat", users=1, turns=4, system_tokens=1024, think_s=0))
    turns = sorted(one, key=lambda r: r.input_length)
    assert len(turns) == 4
    for earlier, later in itertools.pairwise(turns):
        full = earlier.input_length // 512
        assert later.hash_ids[:full] == earlier.hash_ids[:full]  # the history is reused
        if earlier.input_length % 512:  # a partial last block is other content than the full one
            assert later.hash_ids[full] != earlier.hash_ids[full]
    two = generate(Workload(kind="chat", users=2, turns=1, system_tokens=1024))
    assert two[0].hash_ids[:2] == two[1].hash_ids[:2]  # the shared system prompt
    assert two[0].hash_ids[2] != two[1].hash_ids[2]  # and nothing else


def test_bad_configurations_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown policy 'mru'"):
        simulate(HAND, [TierSpec("dram", 3)], block_bytes=1, policy="mru")
    with pytest.raises(ConfigError, match="at least one tier"):
        simulate(HAND, [], block_bytes=1)
    with pytest.raises(ConfigError, match="holds 0 blocks"):
        simulate(HAND, [TierSpec("dram", 0)], block_bytes=1)
    with pytest.raises(ConfigError, match="unknown routing"):
        simulate(HAND, [TierSpec("dram", 3)], block_bytes=1, nodes=2, routing="magic")


def write_trace(path: Path, requests: list[Request]) -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": r.timestamp_ms,
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": list(r.hash_ids),
                }
            )
            + "\n"
            for r in requests
        )
    )
    return path


def test_cli_json_has_the_documented_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = write_trace(tmp_path / "t.jsonl", HAND)
    assert main(["sim", str(trace), "--blocks", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 5 and out["hit_rate_blocks"] == pytest.approx(4 / 11)
    assert out["belady_hit_rate_blocks"] == pytest.approx(7 / 11)
    assert out["infinite_hit_rate_blocks"] == pytest.approx(7 / 11)
    assert out["hit_rate_tokens"] == pytest.approx(2048 / 5596)
    assert out["elapsed_s"] >= 0 and out["tiers"][0]["name"] == "dram"
    assert set(out["ttft_s"]) == {"p50", "p90", "p99"}
    assert out["ttft_s"]["p50"] <= out["ttft_cold_s"]["p50"]
    assert all(out["ttft_queued_s"][q] >= out["ttft_s"][q] for q in ("p50", "p90", "p99"))


def test_cli_sizes_become_blocks_of_the_models_kv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Llama-3.1-8B in bf16: 131,072 bytes per token, 64 MiB per 512-token block.
    trace = write_trace(tmp_path / "t.jsonl", HAND)
    args = ["sim", str(trace), "--model", "Llama-3.1-8B", "--dram", "192MiB", "--ssd", "1GiB"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["capacity_blocks"]) for t in out["tiers"]] == [("dram", 3), ("ssd", 16)]
    assert out["belady_capacity_blocks"] == 19
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Belady" in text and "dram" in text and "p99" in text
    assert main(["sim", str(trace), "--dram", "1MiB"]) == 2
    assert "holds no 512-token block" in capsys.readouterr().err


def test_cli_codec_fits_more_blocks_below_dram_and_reads_fewer_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--codec int8: the SSD tier's bytes hold 1/0.508x the blocks (Llama-3.1-8B's head dim
    128: one bf16 scale per 128 int8 values), DRAM's stay raw, and a hit from the SSD moves
    (and a write stores) that share of a raw block's bytes."""
    trace = write_trace(tmp_path / "t.jsonl", HAND)
    args = ["sim", str(trace), "--model", "Llama-3.1-8B", "--dram", "192MiB", "--ssd", "1GiB"]
    runs = {}
    for codec in (None, "int8"):
        assert main([*args, "--json", *(["--codec", codec] if codec else [])]) == 0
        runs[codec] = json.loads(capsys.readouterr().out)
    raw, coded = runs[None], runs["int8"]
    ratio = (128 + 2) / (2 * 128)
    assert coded["stored_ratio"] == pytest.approx(ratio) and raw["stored_ratio"] == 1.0
    assert [(t["name"], t["capacity_blocks"]) for t in coded["tiers"]] == [("dram", 3), ("ssd", 31)]
    ssd = coded["tiers"][1]
    block = coded["block_bytes"]
    assert ssd["written_bytes"] % int(block * ratio) == 0 and ssd["written_bytes"] > 0
    assert raw["tiers"][1]["written_bytes"] % block == 0
    assert main([*args, "--codec", "int8"]) == 0
    assert "int8 below DRAM: 0.508x the bytes" in capsys.readouterr().out


def test_cli_sweep_writes_png_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl", HAND)
    prefix = tmp_path / "sweep"
    assert main(["sim", str(trace), "--sweep", "1,2,3", "--out", str(prefix)]) == 0
    assert "belady" in capsys.readouterr().out
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["capacities_blocks"] == [1, 2, 3]
    assert set(data["hit_rate_blocks"]) == {*POLICY_NAMES, "belady"}
    assert data["hit_rate_blocks"]["lru"][2] == pytest.approx(4 / 11)
    assert data["hit_rate_blocks"]["belady"][1:] == pytest.approx([6 / 11, 7 / 11])
    assert main(["sim", str(trace), "--sweep", "--blocks", "3"]) == 2
    assert "leave out" in capsys.readouterr().err


def test_cli_bad_lines_name_the_line_or_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = write_trace(tmp_path / "t.jsonl", HAND)
    with trace.open("a") as f:
        f.write('{"timestamp": 9, "input_length": "many", "output_length": 1, "hash_ids": []}\n')
    assert main(["sim", str(trace), "--blocks", "3"]) == 2
    assert "t.jsonl:6: input_length" in capsys.readouterr().err
    assert main(["sim", str(trace), "--blocks", "3", "--skip-bad", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped_lines"] == 1 and out["requests"] == 5


def test_cli_synthetic_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--workload", "chat", "--users", "20", "--blocks", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 20 * 6 and 0 < out["hit_rate_blocks"] <= 1


@pytest.mark.skipif(not TRACE.exists(), reason="the shared conversation trace is not here")
def test_the_readmes_sim_with_a_codec_holds_twice_the_blocks_and_hits_more(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `kvtier sim ... --codec int8` line, as written, from the repository."""
    block = README.read_text().split("## Dense context", 1)[1].split("```sh\n", 1)[1]
    line = next(ln for ln in block.split("```", 1)[0].splitlines() if ln.startswith("kvtier sim"))
    monkeypatch.chdir(REPO)
    words = line.split("#", 1)[0].split()
    assert main(words[1:]) == 0  # as written
    assert "(int8 below DRAM: 0.508x the bytes)" in capsys.readouterr().out
    runs = []
    for args in (words[1:], [w for w in words[1:] if w not in ("--codec", "int8")]):
        assert main([*args, "--no-bounds", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    coded, raw = runs
    ssd = [r["tiers"][1] for r in runs]
    assert ssd[0]["capacity_blocks"] >= 1.9 * ssd[1]["capacity_blocks"]
    assert coded["hit_rate_tokens"] > raw["hit_rate_tokens"]
    assert coded["ttft_s"]["p50"] <= raw["ttft_s"]["p50"]


@pytest.mark.skipif(not TRACE.exists(), reason="the shared conversation trace is not here")
def test_an_object_tier_below_the_shared_one_adds_hits_the_others_evicted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `kvtier sim ... --object` line, as written (from the repository): a pod-wide
    object tier under the shared one holds what the upper tiers evicted, and hits on it."""
    block = README.read_text().split("## Object storage", 1)[1].split("```sh\n", 1)[1]
    line = next(ln for ln in block.split("```", 1)[0].splitlines() if ln.startswith("kvtier sim"))
    words = line.split("#", 1)[0].split()[2:]  # after "kvtier sim"
    assert "--object" in words
    monkeypatch.chdir(REPO)
    runs = []
    for args in (words, words[: words.index("--object")]):
        assert main(["sim", *args, "--no-bounds", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    with_g4, without = runs
    g4 = with_g4["tiers"][-1]
    assert g4["name"] == "object" and g4["shared"] and g4["hit_rate_blocks"] > 0.01
    assert with_g4["hit_rate_tokens"] > without["hit_rate_tokens"] + 0.01
    assert with_g4["ttft_s"]["p50"] <= without["ttft_s"]["p50"]


def test_the_conversation_trace_replays_within_its_bounds() -> None:
    from kvtier.sim.trace import read_trace

    requests = read_trace(TRACE).requests
    results = {
        p: simulate(requests, [TierSpec("dram", 8000)], block_bytes=1, policy=p)
        for p in POLICY_NAMES
    }
    for r in results.values():
        assert r.requests == 12_031 and r.blocks == 288_500
        belady, infinite = r.belady_hit_rate_blocks, r.infinite_hit_rate_blocks
        assert belady is not None and infinite is not None
        assert 0 < r.hit_rate_blocks <= belady <= infinite


@pytest.mark.skipif(not TRACE.exists(), reason="the shared conversation trace is not here")
def test_kvtier_routing_trades_hits_for_queueing_where_cache_aware_does_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = {}
    for routing in ("cache-aware", "kvtier"):
        args = ["sim", str(TRACE), "--dram", "512GB", "--nodes", "4", "--routing", routing]
        assert main([*args, "--no-bounds", "--json"]) == 0
        out[routing] = json.loads(capsys.readouterr().out)
    kv, ca = out["kvtier"], out["cache-aware"]
    assert kv["hit_rate_blocks"] > 0.15 and ca["hit_rate_blocks"] > 0.15
    assert kv["ttft_queued_s"]["p90"] < 0.7 * ca["ttft_queued_s"]["p90"], (kv, ca)
    mean = sum(kv["node_requests"]) / 4
    assert all(abs(n - mean) <= 0.25 * mean for n in kv["node_requests"])
