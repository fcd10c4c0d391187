"""The engine's compute dtype for the host it runs on, chosen by measuring, not assumed.

The embedded model is stored in bfloat16, and bf16 halves the KV bytes of every token (twice
the tokens per tier, half the bytes per load). But bf16 is only fast where the CPU computes it
natively: AVX-512 BF16 or AMX (Intel Cooper Lake and later, AMD Zen 4 and later), where vLLM
runs its matmuls through oneDNN. On a CPU with AVX2 alone, oneDNN refuses a bf16 matmul, vLLM
falls back to torch's own kernel, and that one runs ~50x slower than fp32 (measured on an AMD
EPYC without AVX-512: 1.3 against 64.7 GFLOP/s; a 2,700-token prefill took 3 minutes).

The CPU flags alone do not say how fast a build of torch and oneDNN runs bf16 on a CPU (an
AVX-512 CPU without BF16 converts in software; ``ONEDNN_MAX_CPU_ISA`` and
``ATEN_CPU_CAPABILITY`` cap what they use), so :func:`choose_dtype` times what the engine's
linear layers do: one matmul of the embedded model's shape in bf16 and in fp32, on one thread,
a few tens of milliseconds in all. bf16 is kept unless it is more than
:data:`BF16_SLOWDOWN_LIMIT` times slower than fp32; then fp32 (twice the KV bytes per token).
The flags are reported beside the figures, to explain them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtier.codec import DTYPES

# bf16 halves the KV bytes; it is given up only when its compute is clearly slower.
BF16_SLOWDOWN_LIMIT = 1.5
# The flags that decide how fast bf16 runs, reported as the host has them.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
# One linear layer of the embedded model (SmolLM2-135M's MLP: 576 -> 1536) on 128 tokens.
SHAPE = (128, 576, 1536)
TIME_BUDGET_S = 0.05  # per dtype: enough repeats for a stable minimum, bounded if bf16 crawls
MIN_RUNS = 5  # ~25 ms each in bf16 on a CPU with AVX2 alone, ~5 in fp32
# How `kvtier pod` and the benchmarks hand their one choice to each `kvtier serve` (as JSON).
HANDED_DTYPE = "--engine-dtype-choice"
# vLLM's --dtype values -> the KV dtype they make.
KV_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}


@dataclass(frozen=True)
class HostCpu:
    """What this host's CPU offers for the engine's arithmetic."""

    model: str  # "AMD EPYC", from /proc/cpuinfo ("" where there is none)
    capability: str  # torch's CPU kernel level: "AVX2", "AVX512", ... ("" without torch)
    flags: tuple[str, ...]  # those of CPU_FLAGS the CPU has

    @classmethod
    def read(cls, cpuinfo: Path = Path("/proc/cpuinfo"), with_torch: bool = True) -> HostCpu:
        """This host's CPU; ``with_torch=False`` leaves out torch's capability (and its
        import, seconds)."""
        text = cpuinfo.read_text(errors="replace") if cpuinfo.exists() else ""
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        flags_line = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        present = set(flags_line.group(1).split()) if flags_line else set()
        capability = ""
        if with_torch:
            try:
                import torch

                capability = str(torch.backends.cpu.get_cpu_capability())
            except ImportError:
                pass
        return cls(
            model.group(1).strip() if model else "",
            capability,
            tuple(f for f in CPU_FLAGS if f in present),
        )

    @property
    def native_bf16(self) -> bool:
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def describe(self) -> str:
        """``AMD EPYC, torch AVX2, no AVX-512 BF16/AMX``: one phrase for logs and reports."""
        parts = [self.model or "unknown CPU"]
        if self.capability:
            parts.append(f"torch {self.capability}")
        parts.append(
            "native bf16 (AVX-512 BF16/AMX)" if self.native_bf16 else "no AVX-512 BF16/AMX"
        )
        return ", ".join(parts)


@dataclass(frozen=True)
class DtypeChoice:
    """The engine's dtype, who chose it and why.

    ``source``: "measured" (bf16 against fp32 on this host), "--dtype" (the user's, kept as
    given), or "gpu" (the checkpoint's own dtype: vLLM's default on an accelerator).
    """

    dtype: str
    source: str
    reason: str
    cpu: HostCpu | None = None
    gflops: dict[str, float] = field(default_factory=dict)  # dtype -> measured GFLOP/s

    @property
    def kv_dtype(self) -> str:
        """The dtype of the KV cache the engine computes (vLLM's KV follows the model's)."""
        return KV_DTYPES.get(self.dtype, "bfloat16")  # "auto": the checkpoint's, bf16

    @property
    def kv_itemsize(self) -> int:
        """Bytes per KV value: 4 in fp32, 2 in bf16 or fp16 (as the codec stores them)."""
        return DTYPES[self.kv_dtype][1]

    def line(self) -> str:
        """What ``kvtier serve`` and ``kvtier pod`` print at start."""
        return f"engine dtype {self.dtype} ({self.source}: {self.reason})"

    def serve_options(self) -> list[str]:
        """The options that give a ``kvtier serve`` engine this choice."""
        if self.source == "--dtype":
            return ["--dtype", self.dtype]
        return [HANDED_DTYPE, json.dumps(self.as_dict())]

    def vllm_options(self) -> list[str]:
        """The options that give a plain vLLM server the same dtype (none on an accelerator:
        the checkpoint's)."""
        return [] if self.source == "gpu" else ["--dtype", self.dtype]

    def summary(self) -> str:
        """One line for a benchmark's output: the CPU and the dtype it ran with."""
        cpu = (self.cpu or HostCpu.read()).describe()
        return f"CPU {cpu}; engine dtype {self.dtype} ({self.source}), KV in {self.kv_dtype}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu"] = (
            None if self.cpu is None else {**asdict(self.cpu), "flags": list(self.cpu.flags)}
        )
        data["kv_dtype"] = self.kv_dtype
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DtypeChoice:
        cpu = data.get("cpu")
        return cls(
            str(data["dtype"]),
            str(data["source"]),
            str(data.get("reason", "")),
            HostCpu(cpu["model"], cpu["capability"], tuple(cpu["flags"])) if cpu else None,
            {k: float(v) for k, v in (data.get("gflops") or {}).items()},
        )


def given_dtype(dtype: str) -> DtypeChoice:
    """The user's ``--dtype``: used as given."""
    return DtypeChoice(
        dtype, "--dtype", "given on the command line", HostCpu.read(with_torch=False)
    )


def host_dtype(given: str | None, has_gpu: bool) -> DtypeChoice:
    """The user's ``--dtype`` if given, else the one measured here (benchmarks, pods)."""
    return given_dtype(given) if given else choose_dtype(has_gpu)


def matmul_gflops(dtype_name: str, budget_s: float = TIME_BUDGET_S) -> float:
    """GFLOP/s of one linear layer of :data:`SHAPE` in ``dtype_name``, on one thread (the
    best of as many repeats as fit in ``budget_s``, at least :data:`MIN_RUNS`: on a busy host
    some run is still left alone)."""
    import torch

    dtype = getattr(torch, dtype_name)
    m, k, n = SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ratio is what counts; one thread is steadier on a busy host
    try:
        torch.nn.functional.linear(x, w)  # first call: kernel selection, allocation
        best = float("inf")
        started = time.perf_counter()
        runs = 0
        while runs < MIN_RUNS or time.perf_counter() - started < budget_s:
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
            runs += 1
    finally:
        torch.set_num_threads(threads)
    return 2 * m * k * n / best / 1e9


def choose_dtype(
    has_gpu: bool, measure: Callable[[str], float] = matmul_gflops, cpu: HostCpu | None = None
) -> DtypeChoice:
    """The faster dtype for this host (see the module's docstring)."""
    if has_gpu:
        return DtypeChoice("bfloat16", "gpu", "an accelerator computes bf16 natively")
    cpu = cpu or HostCpu.read()
    rates = {"bfloat16": measure("bfloat16"), "float32": measure("float32")}
    slowdown = rates["float32"] / rates["bfloat16"]
    figures = (
        f"bf16 matmul {rates['bfloat16']:.1f} GFLOP/s against fp32"
        f" {rates['float32']:.1f} on {cpu.describe()}"
    )
    if slowdown > BF16_SLOWDOWN_LIMIT:
        reason = f"{figures}: bf16 is {slowdown:.1f}x slower, so fp32 (twice the KV bytes)"
        return DtypeChoice("float32", "measured", reason, cpu, rates)
    reason = f"{figures}: bf16 is as fast or faster, and half the KV bytes"
    return DtypeChoice("bfloat16", "measured", reason, cpu, rates)
