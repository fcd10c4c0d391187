"""The arguments of ``kvtier bench ttft``, ``bench overlap`` and ``bench chat`` (the
benchmarks: :mod:`kvtier.bench.ttft`, :mod:`kvtier.bench.overlap`, :mod:`kvtier.bench.chat`)."""

from __future__ import annotations

import argparse
from typing import Any

from kvtier import quant
from kvtier.bench import chat, overlap, ttft


def register(bsub: Any) -> None:
    register_ttft(bsub)
    register_overlap(bsub)
    register_chat(bsub)


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
    p.add_argument(
        "--s3-url",
        metavar="URL",
        help="object store for kvtier_s3, http://HOST:PORT/BUCKET or s3://BUCKET (default: a"
        " private SeaweedFS on loopback; credentials from the AWS environment otherwise)",
    )
    p.add_argument("--no-example", action="store_true", help="skip vLLM's ExampleConnector")
    p.add_argument("--no-overhead", action="store_true", help="skip the no-reuse overhead")
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="also the disk and Redis hits with chunks sealed at rest (--master-key-file),"
        " the no-reuse overhead with sealing, and AES-256-GCM's speed beside memcpy",
    )
    p.add_argument(
        "--codec",
        metavar="NAME",
        choices=(*quant.LOSSY, "zstd", "lz4"),
        help="also the disk and Redis hits with chunks stored in this codec (int8, k8v4, fp8,"
        " int4, int4r, bf16, zstd, lz4; `kvtier serve --codec TIER=NAME`), the no-reuse"
        " overhead with the disk tier in it, and its decode speed beside the tiers' raw read speed",
    )
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


def register_chat(bsub: Any) -> None:
    p = bsub.add_parser(
        "chat",
        help="multi-round chat in bursts through kvtier serve: hits first vs FCFS vs no cache",
        description=chat.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bursts", type=int, default=8, help="bursts, each with a new user (8)")
    p.add_argument("--burst", type=int, default=4, help="requests per burst, one cold (4)")
    p.add_argument(
        "--met",
        type=int,
        metavar="USERS",
        help="users whose first turn comes before the bursts (default: enough that returning"
        " users' contexts are gone from vLLM's cache when they return: 9 at the defaults)",
    )
    p.add_argument("--history", type=int, default=2000, help="tokens of each document (2000)")
    p.add_argument("--answer", type=int, default=16, help="tokens of each answer (16)")
    p.add_argument(
        "--isolated",
        type=int,
        default=3,
        help="users whose next turn is then sent alone, an isolated hit (3)",
    )
    p.add_argument(
        "--modes",
        default=",".join(chat.MODES),
        help="paths to run, comma-separated (baseline,fcfs,hits-first)",
    )
    p.add_argument(
        "--step-s", type=float, metavar="SECONDS", help="hits-first's step target (serve's)"
    )
    p.add_argument(
        "--max-step-s", type=float, metavar="SECONDS", help="hits-first's longest step (serve's)"
    )
    p.add_argument(
        "--block-size",
        type=int,
        metavar="TOKENS",
        help="vLLM's KV block size on every path (vLLM's default: 128 on CPU); a returning"
        " turn recomputes the partial block before its new tokens",
    )
    p.add_argument(
        "--pod",
        type=int,
        default=0,
        metavar="N",
        help="run each path through `kvtier pod --engines N` (its router, a shared tier;"
        " each engine on its own cores) instead of one `kvtier serve` (0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        metavar="DTYPE",
        help="the engines' dtype (vLLM's --dtype; default: the faster on this host, measured)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=chat.run)
