"""The arguments of ``kvtier bench pod`` (the benchmark: :mod:`kvtier.bench.pod`)."""

from __future__ import annotations

import argparse
from typing import Any

from kvtier.bench import pod


def register(bsub: Any) -> None:
    p = bsub.add_parser(
        "pod",
        help="KV-aware routing and disaggregated prefill/decode, through kvtier pod",
        description=pod.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--users", type=int, default=6, help="chat users (6)")
    p.add_argument("--turns", type=int, default=6, help="turns per user (6)")
    p.add_argument(
        "--context", type=int, default=4000, help="tokens of each user's document (4000)"
    )
    p.add_argument("--answer", type=int, default=24, help="tokens of each answer (24)")
    p.add_argument("--streams", type=int, default=2, help="decoding streams in the P/D runs (2)")
    p.add_argument("--long", type=int, default=6, help="long prompts in the P/D runs (6)")
    p.add_argument("--long-tokens", type=int, default=2000, help="tokens of a long prompt")
    p.add_argument("--every", type=float, default=6.0, help="seconds between long prompts (6)")
    p.add_argument(
        "--overhead-tokens",
        type=int,
        default=8000,
        help="prompt tokens of the router-overhead chat (8000)",
    )
    p.add_argument(
        "--skip", choices=("routing", "pd"), action="append", default=[], help="leave out a part"
    )
    p.add_argument(
        "--dram",
        metavar="SIZE",
        help="each engine's DRAM tier (default: 60%% of all users' contexts)",
    )
    p.add_argument(
        "--dtype",
        metavar="DTYPE",
        help="the engines' dtype (vLLM's --dtype; default: the faster on this host, measured"
        " once for every pod, as `kvtier pod` does)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=pod.run)
