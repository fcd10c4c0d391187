"""`kvtier plan`: KV footprints against hand-computed values, tier load times vs recompute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.capacity.hardware import load_hardware
from kvtier.capacity.models import PRESETS, load_model
from kvtier.capacity.plan import human_bytes, make_plan
from kvtier.cli.main import main
from kvtier.errors import ConfigError


@pytest.mark.parametrize(
    "name,per_token",
    [
        ("Llama-3.1-8B", 2 * 32 * 8 * 128 * 2),
        ("Llama-3.1-70B", 2 * 80 * 8 * 128 * 2),
        ("Llama-3.1-405B", 516_096),
        ("Qwen2.5-7B", 2 * 28 * 4 * 128 * 2),
        ("Qwen2.5-72B", 2 * 80 * 8 * 128 * 2),
        ("DeepSeek-V3", 61 * (512 + 64) * 2),  # MLA: one latent per layer, no K/V heads
        ("SmolLM2-135M", 2 * 30 * 3 * 64 * 2),
    ],
)
def test_bf16_bytes_per_token_of_the_presets(name: str, per_token: int) -> None:
    model = load_model(name.lower())
    assert model.kv_bytes_per_token("bf16") == per_token
    assert model.kv_bytes_per_token("fp32") == 2 * per_token
    assert model.kv_bytes_per_token("fp8") == per_token // 2
    assert model.kv_bytes_per_token("fp4") == per_token // 4


def test_the_published_405b_figures() -> None:
    plan = make_plan(load_model("Llama-3.1-405B"), "bf16", 100_000, 128, load_hardware("H100"))
    assert plan.bytes_per_token == 516_096
    assert plan.bytes_per_user == 51_609_600_000
    assert human_bytes(plan.bytes_per_user) == "51.6 GB (48.1 GiB)"
    assert human_bytes(plan.total_bytes) == "6.6 TB (6.0 TiB)"
    assert plan.hbm_gpus == 83  # 6.6 TB over 80 GB of HBM each


def test_load_times_follow_bandwidth_and_recompute_follows_flops() -> None:
    model = load_model("Llama-3.1-70B")
    plan = make_plan(model, "bf16", 32_000, 1, load_hardware("H100"))
    ssd = next(t for t in plan.tiers if t.tier == "ssd")
    assert ssd.load_s == pytest.approx(32_000 * 327_680 / 50e9)
    flops = 2 * 70.6e9 * 32_000 + 2 * 80 * 64 * 128 * 32_000**2
    assert plan.recompute_s == pytest.approx(flops / (989e12 * 8 * 0.5))
    assert plan.slowest_tier_beating_recompute == "object"
    g4 = next(t for t in plan.tiers if t.tier == "object")  # G4: the node's S3 throughput
    assert g4.load_s == pytest.approx(32_000 * 327_680 / 12.5e9) and g4.capacity_bytes is None
    slow = load_hardware("H100", {"nvme_bw": 1e8, "network_bw": 1e6, "object_bw": 1e6})
    plan = make_plan(model, "bf16", 32_000, 1, slow)
    beats = {t.tier: t.beats_recompute for t in plan.tiers}
    assert beats == {"hbm": True, "dram": True, "ssd": False, "shared": False, "object": False}
    assert plan.slowest_tier_beating_recompute == "dram"


def test_a_hugging_face_config_gives_the_same_figures_as_the_preset(tmp_path: Path) -> None:
    llama = {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
    }
    (tmp_path / "config.json").write_text(json.dumps(llama))
    model = load_model(str(tmp_path))
    assert model.kv_bytes_per_token() == PRESETS["llama-3.1-8b"].kv_bytes_per_token()
    assert model.params == pytest.approx(8.03e9, rel=0.01)
    mla = {**llama, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128}
    (tmp_path / "config.json").write_text(json.dumps(mla))
    assert load_model(str(tmp_path / "config.json")).kv_bytes_per_token() == 32 * 576 * 2
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_model(str(tmp_path))


def test_cli_json_and_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "llama-3.1-405b", "--users", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes_per_token"] == 516_096 and out["total_bytes"] == 6_606_028_800_000
    assert {t["tier"] for t in out["tiers"]} == {"hbm", "dram", "ssd", "shared", "object"}
    assert all(t["load_s"] > 0 for t in out["tiers"]) and out["recompute_s"] > 0
    assert main(["plan", "SmolLM2-135M", "--set", "dram_bytes=512GiB"]) == 0
    assert "23,040 bytes" in capsys.readouterr().out
    for argv, message in [
        (["plan", "no-such-model"], "not a preset"),
        (["plan", "Qwen2.5-7B", "--dtype", "int3"], "KV dtype 'int3'"),
        (["plan", "Qwen2.5-7B", "--hardware", "TPU"], "hardware 'TPU'"),
        (["plan", "Qwen2.5-7B", "--set", "gpus=2"], "unknown hardware field"),
        (["plan", "Qwen2.5-7B", "--users", "0"], "must be positive"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
