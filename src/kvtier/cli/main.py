"""``kvtier``: the command-line entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from kvtier import __version__
from kvtier.errors import KvtierError

_DESCRIPTION = """\
kvtier keeps LLM KV caches in a hierarchy of tiers (host DRAM, local SSD, Redis/Valkey)
so that a prompt's cached prefix is loaded instead of recomputed.

examples:
  kvtier bench store --tier disk            # store throughput vs the raw disk, side by side
  kvtier bench store --tier redis --json    # starts a private redis-server on loopback
  kvtier inspect --disk ~/.cache/kvtier/chunks --verify
  kvtier config                             # the effective configuration (YAML + KVTIER_*)
  kvtier serve --port 8000                  # vLLM + kvtier on SmolLM2-135M (OpenAI API)
  kvtier pod --engines 2                    # engines + shared Redis tier + KV-aware router
  kvtier router --worker http://h1:8001 --worker http://h2:8001   # the router alone
  kvtier console --metrics http://127.0.0.1:8000/metrics   # live console at :9000/console/
  kvtier plan Llama-3.1-405B --users 128    # KV footprint, tier load times vs recompute
  kvtier sim trace.jsonl --dram 1TB --ssd 8TB  # replay a trace: hit rates, Belady bound
  kvtier tenants key acme                   # an API key and its tenants-file entry
"""


def build_parser() -> argparse.ArgumentParser:
    from kvtier.cli import (
        bench_cmd,
        config_cmd,
        console_cmd,
        inspect_cmd,
        plan_cmd,
        pod_cmd,
        router_cmd,
        serve_cmd,
        sim_cmd,
        tenants_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="kvtier",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        bench_cmd,
        inspect_cmd,
        config_cmd,
        serve_cmd,
        router_cmd,
        pod_cmd,
        console_cmd,
        plan_cmd,
        sim_cmd,
        tenants_cmd,
    ):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra  # `kvtier serve` hands these to vLLM
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.run(args)
    except KvtierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvtier: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
