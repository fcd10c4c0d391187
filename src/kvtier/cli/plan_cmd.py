"""``kvtier plan``: the KV footprint of a workload, and which tiers load a context faster than
the GPUs recompute it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvtier.errors import ConfigError

_EXAMPLES = """\
models: a preset (Llama-3.1-8B, Llama-3.1-70B, Llama-3.1-405B, Qwen2.5-7B, Qwen2.5-72B,
DeepSeek-V3, SmolLM2-135M; any case) or a Hugging Face config.json / model folder.
hardware: H100, H200, B200, Rubin (a node of 8 GPUs); --set FIELD=VALUE changes any field:
  hbm_bytes hbm_bw flops pcie_bw dram_bytes dram_bw ssd_bytes nvme_bw network_bw
  gpus_per_node mfu   (bytes, bytes/s, FLOP/s; sizes also as 2TB, 512GiB)

examples:
  kvtier plan Llama-3.1-405B --context 100000 --users 128
  kvtier plan DeepSeek-V3 --dtype fp8 --hardware B200 --json
  kvtier plan llama-3.1-405b --codec int8
  kvtier plan ~/models/my-model --set nvme_bw=14e9 --set gpus_per_node=4
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="KV footprint and tier load times vs recompute, for any model",
        description=__doc__,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="preset name, config.json or model folder")
    p.add_argument("--dtype", default="bf16", help="KV dtype: fp32, bf16, fp16, fp8, fp4")
    p.add_argument(
        "--codec",
        help="store the tiers below HBM with a lossy codec (bf16, int8, fp8, k8v4, int4, int4r):"
        " bytes per token with scales, contexts each tier holds before and after, load times",
    )
    p.add_argument("--context", type=int, default=100_000, help="tokens per user's context")
    p.add_argument("--users", type=int, default=1, help="concurrent users")
    p.add_argument("--hardware", default="H100", help="hardware profile (default H100)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _overrides(items: list[str]) -> dict[str, float]:
    from kvtier.config import parse_size

    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            out[key.strip()] = float(parse_size(value.strip(), f"--set {key.strip()}"))
    return out


def run(args: argparse.Namespace) -> int:
    from kvtier.capacity.hardware import load_hardware
    from kvtier.capacity.models import load_model
    from kvtier.capacity.plan import make_plan, render

    plan = make_plan(
        load_model(args.model),
        args.dtype,
        args.context,
        args.users,
        load_hardware(args.hardware, _overrides(args.set)),
        args.codec,
    )
    print(json.dumps(plan.as_dict()) if args.json else render(plan))
    return 0
