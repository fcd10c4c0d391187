"""``kvtier bench store --codec``: what each codec stores per token and how fast it encodes and
decodes, beside a memcpy of the same bytes, in one run.

Chunks are 256 tokens of SmolLM2-135M's KV shape in the engine's dtype, random normal values
with an outlier K channel (as real keys have; speed does not depend on the values). Encoding
runs where kvtier runs it, on the saver's one thread; decoding on the loader's, also one
thread here (``torch.set_num_threads(1)`` for the run): GB/s count the engine dtype's bytes
in or out. A codec pays off on a tier when it decodes faster than the tier reads the bytes
it saves: that bound is printed too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from kvtier import quant, quant4

SHAPE = (30, 2, 256, 3, 64)  # 256 tokens of SmolLM2-135M


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def measure(names: list[str], dtype: str, repeat: int = 5) -> dict[str, Any]:
    """Per codec: stored bytes per token against bf16 and the engine dtype, encode and decode
    GB/s, the round trip's relative RMS error; and memcpy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        kv = torch.randn(SHAPE)
        kv[:, 0, :, :, 5] *= 20
        kv = kv.to(getattr(torch, dtype))
        raw = kv.numel() * kv.element_size()
        tokens = SHAPE[2]
        bf16 = 2 * math.prod(SHAPE)
        copy = torch.empty_like(kv)
        memcpy = raw / _best(lambda: copy.copy_(kv), repeat) / 1e9
        rows = []
        rotated = quant4.native_int4r()
        native = {"int8": quant.native_int8(), "int4r": rotated, "k8v4": rotated}
        for name in names:
            stored = quant.encode(name, kv)
            encode_s = _best(partial(quant.encode, name, kv), repeat)
            torch_gbs = None  # int8, int4r, k8v4: torch's encode of the same bytes (no kernel)
            if name in native:
                torch_s = _best(partial(quant.encode, name, kv, native=False), repeat)
                torch_gbs = raw / torch_s / 1e9
            decode_s = _best(partial(quant.decode, name, stored, SHAPE, kv.dtype), repeat)
            back = quant.decode(name, stored, SHAPE, torch.float32)
            x = kv.float()
            err = ((back - x).norm() / x.norm()).item()  # relative RMS error
            saved = raw - stored.numel()
            decode_gbs = raw / decode_s / 1e9
            rows.append(
                {
                    "codec": name,
                    "bytes_per_token": stored.numel() / tokens,
                    "vs_bf16": stored.numel() / bf16,
                    "vs_raw": stored.numel() / raw,
                    "encode_gb_s": raw / encode_s / 1e9,
                    "encode_torch_gb_s": torch_gbs,
                    "decode_gb_s": decode_gbs,
                    # A tier reading slower than this loads faster with the codec than raw.
                    "pays_below_gb_s": saved / raw * decode_gbs if saved > 0 else 0.0,
                    "rms_rel_error": err,
                }
            )
    finally:
        torch.set_num_threads(threads)
    return {
        "dtype": dtype,
        "shape": list(SHAPE),
        "raw_bytes_per_token": raw / tokens,
        "memcpy_gb_s": memcpy,
        "int8_native": native["int8"],
        "int4r_native": native["int4r"],
        "k8v4_native": native["k8v4"],
        "codecs": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"codecs on {result['dtype']} KV, chunks of {result['shape']} (one thread;"
        f" memcpy {result['memcpy_gb_s']:.2f} GB/s; raw {result['raw_bytes_per_token']:.0f}"
        " bytes per token)"
    )
    print(
        f"{'codec':<6} {'B/token':>8} {'vs bf16':>8} {'vs raw':>7} {'encode GB/s':>12}"
        f" {'decode GB/s':>12} {'pays below':>11} {'rms err':>8}"
    )
    for r in result["codecs"]:
        print(
            f"{r['codec']:<6} {r['bytes_per_token']:>8.0f} {r['vs_bf16']:>8.3f}"
            f" {r['vs_raw']:>7.3f} {r['encode_gb_s']:>12.2f} {r['decode_gb_s']:>12.2f}"
            f" {r['pays_below_gb_s']:>9.2f}GB/s {r['rms_rel_error']:>8.4f}"
        )
    for r in (r for r in result["codecs"] if r["encode_torch_gb_s"]):
        if result.get(f"{r['codec']}_native"):
            print(
                f"{r['codec']} encodes in kvtier's C kernel (kvtier/native, built for this CPU):"
                f" torch's encode of the same bytes runs at {r['encode_torch_gb_s']:.2f} GB/s"
            )
        else:
            print(f"{r['codec']} encodes in torch here: no C compiler, or the kernel did not build")
    print(
        "pays below: a tier reading slower than this loads a chunk faster stored with the codec"
        " (bytes saved / bytes decoded x decode speed); rms err: |decoded - original| /"
        " |original| over the chunk."
    )
