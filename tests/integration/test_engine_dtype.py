"""The engine's dtype is chosen for the host by measuring bf16 against fp32; a user's --dtype
is kept; a pod's engines all get one choice; the choice reaches vLLM's command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.integrations.engine_dtype import (
    BF16_SLOWDOWN_LIMIT,
    DtypeChoice,
    HostCpu,
    choose_dtype,
    given_dtype,
    matmul_gflops,
)

AVX2_HOST = HostCpu("AMD EPYC", "AVX2", ("avx2",))
BF16_HOST = HostCpu("Intel Xeon", "AVX512", ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))


def rates(bf16: float, fp32: float) -> dict[str, float]:
    return {"bfloat16": bf16, "float32": fp32}


@pytest.mark.parametrize(
    ("bf16", "fp32", "cpu", "expected"),
    [
        (1.3, 64.7, AVX2_HOST, "float32"),  # the AVX2-only EPYC of issue 20: 50x slower
        (120.0, 60.0, BF16_HOST, "bfloat16"),  # native bf16: faster, and half the KV bytes
        (50.0, 60.0, BF16_HOST, "bfloat16"),  # a little slower: half the bytes still wins
        (60.0 / BF16_SLOWDOWN_LIMIT - 1, 60.0, BF16_HOST, "float32"),  # past the limit
    ],
)
def test_the_faster_dtype_is_chosen_and_the_reason_says_why(
    bf16: float, fp32: float, cpu: HostCpu, expected: str
) -> None:
    measured = rates(bf16, fp32)
    choice = choose_dtype(False, measure=measured.__getitem__, cpu=cpu)
    assert choice.dtype == expected and choice.source == "measured"
    assert choice.kv_dtype == expected and choice.kv_itemsize == (4 if expected == "float32" else 2)
    assert f"{bf16:.1f} GFLOP/s" in choice.reason and f"fp32 {fp32:.1f}" in choice.reason
    assert cpu.model in choice.reason
    assert choice.serve_options()[0] == "--engine-dtype-choice"
    assert choice.vllm_options() == ["--dtype", expected]
    assert DtypeChoice.from_dict(json.loads(json.dumps(choice.as_dict()))) == choice


def test_an_accelerator_keeps_the_checkpoints_dtype_without_measuring() -> None:
    def never(dtype: str) -> float:
        raise AssertionError("measured on a GPU host")

    choice = choose_dtype(True, measure=never, cpu=AVX2_HOST)
    assert (choice.dtype, choice.source, choice.vllm_options()) == ("bfloat16", "gpu", [])


def test_a_users_dtype_is_kept_as_given() -> None:
    for given, kv in (
        ("float32", "float32"),
        ("bfloat16", "bfloat16"),
        ("half", "float16"),
        ("auto", "bfloat16"),
    ):
        choice = given_dtype(given)
        assert (choice.dtype, choice.source, choice.kv_dtype) == (given, "--dtype", kv)
        assert choice.serve_options() == ["--dtype", given]


def test_this_hosts_measurement_agrees_with_its_cpu_flags() -> None:
    """The real measurement on this machine: a CPU without AVX-512 has no fast bf16 (torch
    and oneDNN fall back to a slow kernel), one with AVX-512 BF16 or AMX computes it
    natively; in between (AVX-512 without BF16) either answer can be right."""
    cpu = HostCpu.read()
    assert matmul_gflops("float32") > 0.5  # any CPU of this decade, one thread
    choice = choose_dtype(False, cpu=cpu)
    assert set(choice.gflops) == {"bfloat16", "float32"}
    if "avx512f" not in cpu.flags and cpu.capability in ("AVX2", "DEFAULT"):
        assert choice.dtype == "float32", choice.reason
    if cpu.native_bf16:
        assert choice.dtype == "bfloat16", choice.reason


def dry_run(*args: str) -> tuple[list[str], str]:
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli.main", "serve", "--dry-run", "--disk", "none", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def connector_extra(command: list[str]) -> dict[str, object]:
    transfer = json.loads(command[command.index("--kv-transfer-config") + 1])
    return dict(transfer["kv_connector_extra_config"])


def test_kvtier_serve_gives_vllm_the_measured_dtype_and_its_checkpoint() -> None:
    command, err = dry_run()
    reported = connector_extra(command)["engine_dtype"]
    assert isinstance(reported, dict) and reported["source"] == "measured"
    dtype = reported["dtype"]
    assert command[command.index("--dtype") + 1] == dtype
    assert f"kvtier serve: engine dtype {dtype} (measured: bf16 matmul" in err
    # The checkpoint stored in that dtype: vLLM loads it without converting.
    model = Path(command[command.index("--model") + 1])
    config = json.loads((model / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype


def test_a_users_dtype_goes_to_vllm_unchanged() -> None:
    for given in ("bfloat16", "float32"):
        command, err = dry_run("--dtype", given)
        assert command.count("--dtype") == 1 and command[-2:] == ["--dtype", given]
        assert f"engine dtype {given} (--dtype: given on the command line)" in err
        model = Path(command[command.index("--model") + 1])
        assert json.loads((model / "config.json").read_text())["dtype"] == given


def test_a_handed_over_choice_is_used_as_is_and_a_bad_one_is_refused() -> None:
    handed = choose_dtype(False, measure=rates(1.0, 60.0).__getitem__, cpu=AVX2_HOST)
    command, err = dry_run(*handed.serve_options())
    assert command[command.index("--dtype") + 1] == "float32"
    assert connector_extra(command)["engine_dtype"] == handed.as_dict()
    assert "bf16 matmul 1.0 GFLOP/s against fp32 60.0" in err
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtier.cli.main",
            "serve",
            "--dry-run",
            "--engine-dtype-choice",
            '{"dtype": 1}',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--engine-dtype-choice: not a dtype choice" in bad.stderr


def test_both_checkpoints_hold_the_same_weights() -> None:
    """fp32 is the bf16 checkpoint upcast, exactly: both dtypes serve one model."""
    import torch
    from safetensors.torch import load_file

    from kvtier.integrations.model import prepare_default_model

    bf16 = load_file(prepare_default_model(dtype="bfloat16") / "model.safetensors")
    fp32 = load_file(prepare_default_model(dtype="float32") / "model.safetensors")
    assert bf16.keys() == fp32.keys()
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16 and fp32[name].dtype == torch.float32
        assert torch.equal(tensor.to(torch.float32), fp32[name]), name
