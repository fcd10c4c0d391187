"""The quality gate's record, `kvtier serve --codec` against it, and `kvtier plan --codec`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvtier import gate
from kvtier.capacity.hardware import load_hardware
from kvtier.capacity.models import load_model
from kvtier.capacity.plan import make_plan, render
from kvtier.config import DiskTierConfig, MemoryTierConfig, RedisTierConfig, StoreConfig
from kvtier.errors import ConfigError
from kvtier.runtime.codecs import apply_codecs


def row(codec: str, top1: float, kl: float, accuracy: float) -> dict[str, object]:
    return {
        "codec": codec,
        "positions": 200,
        "kl_mean": kl,
        "kl_p99": 5 * kl,
        "top1_agreement": top1,
        "greedy_agreement": top1,
        "accuracy": accuracy,
    }


RESULT = {
    "reference_accuracy": 0.75,
    "codecs": [
        row("bf16", 1.0, 0.0001, 0.75),
        row("int8", 0.995, 0.002, 0.75),
        row("fp8", 0.985, 0.02, 0.75),  # top-1 and KL over the line
        row("int4", 0.99, 0.008, 0.70),  # 5 points of accuracy lost
    ],
}


@pytest.fixture(autouse=True)
def gate_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVTIER_FIDELITY_DIR", str(tmp_path / "fidelity"))
    return tmp_path / "fidelity"


def test_the_gate_records_what_passed_and_auto_picks_the_smallest() -> None:
    assert gate.best_passed("config-abc") is None  # never measured
    path = gate.record("config-abc", "/models/m", "float32", RESULT)
    assert path.name == "config-abc.json"
    entry = gate.load("config-abc")
    assert entry is not None and entry["passed"] == ["bf16", "int8"]
    assert gate.best_passed("config-abc") == "int8"
    assert gate.load("config-other") is None


def test_auto_says_when_its_codec_was_not_checked_through_the_product() -> None:
    """A record without the served check: auto picks what passed on the model and says it was
    not measured through kvtier serve; naming a codec that passed needs no note."""
    k8v4 = row("k8v4", 0.993, 0.003, 0.75)
    codecs = [*RESULT["codecs"], k8v4]  # type: ignore[misc]
    gate.record("config-abc", "/models/m", "float32", {**RESULT, "codecs": codecs})
    assert gate.best_passed("config-abc") == "k8v4" and gate.served("config-abc", "k8v4") is None
    got, notes = apply_codecs(config(), [], "config-abc", False)  # no --codec: auto, said
    assert [t.compression for t in got.tiers] == ["none", "k8v4", "k8v4"]
    assert any("k8v4 was measured on the model, not yet through kvtier serve" in n for n in notes)
    got, notes = apply_codecs(config(), ["disk=int8"], "config-abc", False)  # by name: allowed
    assert got.tiers[1].compression == "int8" and notes == []


def served_row(codec: str, agreement: float, hit: int = 900) -> dict[str, object]:
    return {"codec": codec, "identical": 7, "greedy_agreement": agreement, "accuracy": 0.75,
            "hit_tokens": hit, "prompt_tokens": 1000}  # fmt: skip


def test_the_served_check_decides_what_the_model_level_gate_cannot_see() -> None:
    """`kvtier bench fidelity --served`: a codec whose answers through kvtier serve fall more
    than MARGIN below its model-level greedy agreement does not pass (auto then passes it
    over); a restart that did not load measured nothing and fails; `none`, the raw chunks,
    is the product's own noise."""
    from kvtier.bench import served

    k8v4 = row("k8v4", 0.993, 0.003, 0.75)
    codecs = [*RESULT["codecs"], k8v4]  # type: ignore[misc]
    measured = {
        "rows": [
            served_row("none", 1.0),
            served_row("int8", 0.99 - served.MARGIN - 0.01),  # below its 99.5%, less MARGIN
            served_row("k8v4", 0.90),
            served_row("bf16", 1.0, hit=100),  # the restart computed its prompts itself
        ]
    }
    served.judge(measured, codecs)
    verdicts = {r["codec"]: r["passed"] for r in measured["rows"]}
    assert verdicts == {"none": None, "int8": False, "k8v4": True, "bf16": False}
    assert measured["rows"][1]["model_greedy_agreement"] == 0.995
    gate.record(
        "config-abc", "/models/m", "float32", {**RESULT, "codecs": codecs, "served": measured}
    )
    entry = gate.load("config-abc")
    assert entry is not None and entry["passed"] == ["k8v4"]  # int8 and bf16 failed served
    assert gate.best_passed("config-abc") == "k8v4"
    got, notes = apply_codecs(config(), [], "config-abc", False)
    assert got.tiers[1].compression == "k8v4" and not any("not yet through" in n for n in notes)
    measured["rows"][2]["greedy_agreement"] = 0.5  # k8v4 changed answers through the product
    served.judge(measured, codecs)
    gate.record(
        "config-abc", "/models/m", "float32", {**RESULT, "codecs": codecs, "served": measured}
    )
    assert gate.best_passed("config-abc") is None


def test_a_codec_may_lose_one_point_of_top1_beyond_the_engines_own_floor() -> None:
    """bf16 engines: the KV recomputed in pieces (the same KV) already flips near-tied top-1
    picks; the line is 99% less that floor, and stays 99% where the floor is 100%."""
    codecs = [row("int8", 0.975, 0.0015, 0.75), row("fp8", 0.965, 0.003, 0.75)]
    floor = row("recomputed", 0.98, 0.0013, 0.75)
    gate.record("config-bf16", "/m", "bfloat16", {"reference_accuracy": 0.75, "codecs": codecs})
    assert gate.load("config-bf16")["passed"] == []  # type: ignore[index]  # no floor: 99%
    result = {"reference_accuracy": 0.75, "codecs": codecs, "floor": floor}
    gate.record("config-bf16", "/m", "bfloat16", result)
    entry = gate.load("config-bf16")
    assert entry is not None and entry["passed"] == ["int8"]  # >= 97%, fp8's 96.5% is not
    assert entry["thresholds"]["top1_min"] == pytest.approx(0.97)
    assert entry["thresholds"]["top1_floor"] == 0.98 and entry["floor"] == floor
    assert gate.top1_min(row("recomputed", 1.0, 0.0, 0.75)) == gate.TOP1_MIN == 0.99
    # The floor moves top-1's line only: KL and accuracy hold as they are.
    assert not gate.passes(row("int8", 0.99, 0.02, 0.75), 0.75, floor)
    assert not gate.passes(row("int8", 0.99, 0.001, 0.70), 0.75, floor)


def config() -> StoreConfig:
    return StoreConfig(
        tiers=(
            MemoryTierConfig(),
            DiskTierConfig(path="/tmp/x"),
            RedisTierConfig(url="redis://127.0.0.1:6379/0"),
        )
    )


def test_serve_refuses_a_codec_the_model_did_not_pass_unless_forced() -> None:
    gate.record("config-abc", "/models/m", "float32", RESULT)
    got, notes = apply_codecs(config(), ["disk=int8", "redis=zstd"], "config-abc", False)
    assert [t.compression for t in got.tiers] == ["none", "int8", "zstd"] and notes == []
    with pytest.raises(ConfigError, match=r"int4 has not passed .*accuracy 70.0% against 75.0%"):
        apply_codecs(config(), ["disk=int4"], "config-abc", False)
    with pytest.raises(ConfigError, match="never measured"):
        apply_codecs(config(), ["disk=int8"], "config-new", False)
    got, notes = apply_codecs(config(), ["redis=fp8"], "config-abc", True)
    assert got.tiers[2].compression == "fp8"
    assert "forced" in notes[0] and "top-1 98.5%" in notes[0]
    # Before the model is known (the options' first check) only the syntax is checked.
    apply_codecs(config(), ["disk=int4"], None, False)
    for bad in ("int8", "tape=int8", "disk=int3"):
        with pytest.raises(ConfigError, match=f"--codec {bad}"):
            apply_codecs(config(), [bad], "config-abc", False)


def test_auto_gives_the_lower_tiers_the_best_codec_that_passed() -> None:
    gate.record("config-abc", "/models/m", "float32", RESULT)
    got, notes = apply_codecs(config(), ["auto"], "config-abc", False)
    assert [t.compression for t in got.tiers] == ["none", "int8", "int8"]
    got, notes = apply_codecs(config(), ["auto"], "config-new", False)
    assert [t.compression for t in got.tiers] == ["none", "none", "none"]
    assert "no lossy codec has passed" in notes[0]
    # No --codec: the same, for the tiers the configuration leaves raw; `none`: all raw.
    zstd = dataclasses.replace(
        config(),
        tiers=(
            *config().tiers[:2],
            RedisTierConfig(url="redis://127.0.0.1:6379/0", compression="zstd"),
        ),
    )
    got, notes = apply_codecs(zstd, [], "config-abc", False)
    assert [t.compression for t in got.tiers] == ["none", "int8", "zstd"]
    assert notes[0] == (
        "no --codec: disk stores int8, the smallest codec that passed the quality gate for this"
        " model (--codec none: raw)"
    )
    assert len(notes) == 2 and "not yet through kvtier serve" in notes[1]  # no --served run
    got, notes = apply_codecs(zstd, ["none"], "config-abc", False)
    assert [t.compression for t in got.tiers] == ["none", "none", "none"] and notes == []


def test_of_two_codecs_of_one_size_auto_picks_the_one_measured_closer() -> None:
    """int8 and int8c store the same bytes: the lower mean KL wins."""
    for closer, farther in (("int8c", "int8"), ("int8", "int8c")):
        codecs = [row(closer, 1.0, 0.0001, 0.75), row(farther, 1.0, 0.0002, 0.75)]
        gate.record("config-abc", "/m", "float32", {"reference_accuracy": 0.75, "codecs": codecs})
        assert gate.best_passed("config-abc") == closer


def test_plan_with_a_codec_holds_more_contexts_per_tier() -> None:
    model, hw = load_model("llama-3.1-405b"), load_hardware("H100", {})
    raw = make_plan(model, "bf16", 100_000, 128, hw)
    coded = make_plan(model, "bf16", 100_000, 128, hw, "int8")
    assert raw.bytes_per_token == 516_096
    assert coded.codec_bytes_per_token == int(516_096 / 2 * (1 + 2 / 128))
    dram = {t.tier: t for t in coded.tiers}["dram"]
    assert dram.users_held_codec is not None and dram.users_held is not None
    assert dram.users_held_codec >= 1.9 * dram.users_held
    assert dram.load_s < {t.tier: t for t in raw.tiers}["dram"].load_s
    assert "stored as int8" in render(coded)
