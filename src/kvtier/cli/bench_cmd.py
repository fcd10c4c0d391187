"""``kvtier bench``: the group, and the arguments of ``bench store`` and ``bench dtype``
(the benchmarks themselves: :mod:`kvtier.bench`)."""

from __future__ import annotations

import argparse
from typing import Any

from kvtier import quant
from kvtier.bench import dtype, store
from kvtier.cli import bench_fidelity_cmd, bench_pod_cmd, bench_ttft_cmd


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks: store throughput, time to first token")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    s = bsub.add_parser(
        "store",
        help="put/get throughput of one tier vs the raw medium",
        description=store.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--tier", choices=sorted(store.TARGETS), help="tier to measure")
    s.add_argument(
        "--codec",
        metavar="NAMES",
        help="codecs to measure (comma-separated, or all: " + ", ".join(quant.LOSSY) + "):"
        " bytes per token, encode and decode GB/s beside memcpy, round-trip error",
    )
    s.add_argument(
        "--chunk-mb",
        type=float,
        help="chunk size in MB (default: 256 tokens of SmolLM2-135M in --dtype, 5.9 in bf16,"
        " 11.8 in fp32; 32 is 256 tokens of Llama-3-8B in bf16)",
    )
    s.add_argument(
        "--dtype",
        choices=store.KV_DTYPES,
        help="KV dtype of the chunks (default: the engine dtype `kvtier serve` picks on this"
        " host, measured: float32 on CPUs without AVX-512 BF16/AMX, else bfloat16)",
    )
    s.add_argument("--total-mb", type=float, default=1024, help="bytes moved per round (MB)")
    s.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is kept")
    s.add_argument(
        "--dir",
        help="disk: directory to write in (default: a temporary directory"
        " under ~/.cache/kvtier, removed afterwards)",
    )
    s.add_argument(
        "--cold",
        action="store_true",
        help="disk: drop the files from the page cache before every read",
    )
    s.add_argument("--no-fsync", action="store_true", help="disk: skip fsync on both sides")
    s.add_argument(
        "--redis",
        metavar="URL",
        help="redis: server to use (default: a private redis-server on loopback)",
    )
    s.add_argument(
        "--s3-url",
        metavar="URL",
        help="s3: bucket to use, http://HOST:PORT/BUCKET or s3://BUCKET (default: a private"
        " SeaweedFS on loopback; credentials from the AWS environment otherwise)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(run=store.run)
    bench_ttft_cmd.register(bsub)
    bench_pod_cmd.register(bsub)
    bench_fidelity_cmd.register(bsub)
    register_dtype(bsub)


def register_dtype(bsub: Any) -> None:
    p = bsub.add_parser(
        "dtype",
        help="cold TTFT with the engine dtype kvtier picks against each dtype forced",
        description=dtype.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int, default=2003, help="prompt tokens (2003)")
    p.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="dtypes to force by hand, comma-separated (float32,bfloat16)",
    )
    p.add_argument("--repeat", type=int, default=2, help="cold prompts per server (2)")
    p.add_argument(
        "--slow-tokens",
        type=int,
        metavar="N",
        help="prompt tokens for a forced dtype that is not the one picked (default: --tokens)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=dtype.run)
