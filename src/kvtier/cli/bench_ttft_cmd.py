"""The arguments of ``kvtier bench ttft`` and ``kvtier bench overlap`` (the benchmarks:
:mod:`kvtier.bench.ttft`, :mod:`kvtier.bench.overlap`)."""

from __future__ import annotations

import argparse
from typing import Any

from kvtier.bench import overlap, ttft


def register(bsub: Any) -> None:
    register_ttft(bsub)
    register_overlap(bsub)


def register_ttft(bsub: Any) -> None:
    p = bsub.add_parser(
        "ttft",
        help="time to first token through kvtier serve: cold, vLLM prefix cache, kvtier tiers",
        description=ttft.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tokens",
        default="1000,5000,8000",
        help="prompt lengths, comma-separated, 256 < n < 8192 (default 1000,5000,8000)",
    )
    p.add_argument("--tiers", default=",".join(ttft.TIERS), help="kvtier tiers to measure")
    p.add_argument("--redis", metavar="URL", help="Redis to use (default: a private server)")
    p.add_argument("--no-example", action="store_true", help="skip vLLM's ExampleConnector")
    p.add_argument("--no-overhead", action="store_true", help="skip the no-reuse overhead")
    p.add_argument("--batch", type=int, default=6, help="distinct prompts per overhead round")
    p.add_argument("--rounds", type=int, default=3, help="timed overhead rounds per engine")
    p.add_argument("--engines", type=int, default=3, help="overhead engines per side")
    p.add_argument("--repeat", type=int, default=3, help="requests per path (median reported)")
    p.add_argument(
        "--dtype",
        metavar="DTYPE",
        help="every engine's dtype (vLLM's --dtype; default: the faster of bfloat16 and float32"
        " on this host, measured as `kvtier serve` does)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=ttft.run)


def register_overlap(bsub: Any) -> None:
    p = bsub.add_parser(
        "overlap",
        help="inter-token latency of a running stream while another request loads from disk/Redis",
        description=overlap.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=8000, help="long prompt length (8000)")
    p.add_argument(
        "--tiers", default=",".join(overlap.TIERS), help="tiers to load from (disk,redis)"
    )
    p.add_argument(
        "--modes",
        default="prefix,sync,auto",
        help="what to compare (prefix,sync,auto): prefix = a hit from vLLM's own prefix cache,"
        " the reference with nothing to load; sync, auto, async = kvtier serve --loads MODE",
    )
    p.add_argument("--repeat", type=int, default=3, help="long prompts per tier and mode (3)")
    p.add_argument("--warm-tokens", type=int, default=30, help="stream tokens before the load")
    p.add_argument("--redis", metavar="URL", help="Redis to use (default: a private server)")
    p.add_argument(
        "--dtype",
        metavar="DTYPE",
        help="the engines' dtype (vLLM's --dtype; default: the faster on this host, measured)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=overlap.run)
