"""``kvtier pod``: N engines of the embedded model, a shared context tier and the KV-aware
router on one machine, with one command.

Each engine is a ``kvtier serve`` with its own DRAM and disk tiers; all share one Redis tier
(a private redis-server on a free loopback port, or --redis URL for an existing Redis, Valkey,
Kvrocks or Redis Cluster); the router listens on --port and sends each request to the engine
where its context already is. On CPU each engine computes on its own cores. Ctrl-C stops
everything it started. Options kvtier does not know go to every engine's vLLM. The engines'
dtype (vLLM's --dtype) is measured once for all of them unless given: see `kvtier serve`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvtier.cli.router_cmd import add_router_options
from kvtier.errors import KvtierError

EXAMPLE = """\
examples:
  kvtier pod                                   # 2 engines + redis-server + router on :8000
  kvtier pod --engines 4 --redis redis://10.0.0.9:6379/0
  kvtier pod --s3 local                        # + an object tier: a private SeaweedFS
  kvtier pod --num-gpu-blocks-override 64      # a vLLM option, given to every engine
  kvtier pod --prefill 1 --decode 1            # disaggregated: prefill on one, decode on the other
"""

DEFAULT_STATE = Path("~/.cache/kvtier/pod")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pod",
        help="run several engines, a shared tier and the KV-aware router together",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--engines", type=int, help="number of engines (2)")
    p.add_argument(
        "--prefill",
        type=int,
        metavar="P",
        help="disaggregated: P prefill engines; a new prompt is computed on one, written to the"
        " shared tier, and decoded on a --decode engine (unless that one holds most of it)",
    )
    p.add_argument("--decode", type=int, metavar="D", help="disaggregated: D decode engines")
    p.add_argument(
        "--redis",
        metavar="URL",
        help="shared tier (default: a private redis-server; 'none': engines share no tier)",
    )
    p.add_argument(
        "--s3",
        metavar="URL",
        default="none",
        help="object tier (G4) every engine reads and writes, below the shared one: a bucket"
        " (http://HOST:PORT/BUCKET, s3://BUCKET; credentials from the AWS environment), 'local'"
        " (a private SeaweedFS on loopback, started and stopped with the pod), or 'none'"
        " (default)",
    )
    p.add_argument("--dram", metavar="SIZE", default="1GiB", help="DRAM tier per engine (1GiB)")
    p.add_argument(
        "--engine-port",
        type=int,
        metavar="PORT",
        help="first engine's port; the others follow (default: free ports)",
    )
    p.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        metavar="DIR",
        help=f"engines' disk tiers and logs ({DEFAULT_STATE})",
    )
    p.add_argument(
        "--master-key-file",
        metavar="FILE",
        help="encryption at rest in every engine's disk tier and the shared tier (see"
        " `kvtier serve --help`)",
    )
    p.add_argument(
        "--codec",
        action="append",
        metavar="TIER=CODEC",
        help="every engine's tiers' stored form, as `kvtier serve --codec` (repeatable; the"
        " shared tier is `redis`): auto, none, or TIER=CODEC. Default: what the model passed"
        " `kvtier bench fidelity --gate` with, on the tiers below DRAM",
    )
    add_router_options(p)
    p.set_defaults(run=run, passthrough=True)


def run(args: argparse.Namespace) -> int:
    from kvtier.runtime.pod import run_pod

    engines, prefill = _engine_counts(args)
    if args.tenants:
        from kvtier.tenants import load_tenants

        load_tenants(args.tenants)  # a bad file fails before any engine starts
    if args.master_key_file:
        from kvtier.sealing import MasterKeys

        MasterKeys.load(args.master_key_file)  # so does a bad key file
    if args.s3 not in ("none", "local"):
        from kvtier.errors import ConfigError
        from kvtier.tier_config import s3_location

        try:
            s3_location(args.s3)  # a bad URL fails before any engine starts
        except ConfigError as exc:
            raise ConfigError(f"--s3: {exc}") from None
    if prefill and args.redis == "none":
        raise KvtierError(
            "a disaggregated pod hands prompts over through the shared tier:"
            " --redis none is not possible with --prefill"
        )
    run_pod(args, engines, prefill, list(getattr(args, "extra", [])))
    return 0


def _engine_counts(args: argparse.Namespace) -> tuple[int, int]:
    """(engines that answer requests, prefill engines) from --engines or --prefill/--decode."""
    if args.prefill is None and args.decode is None:
        return (2 if args.engines is None else args.engines), 0
    if args.engines is not None:
        raise KvtierError("give --engines (colocated) or --prefill P --decode D, not both")
    if args.prefill is None or args.decode is None:
        raise KvtierError("a disaggregated pod needs both --prefill P and --decode D")
    if args.prefill < 1 or args.decode < 1:
        raise KvtierError(
            f"--prefill and --decode must be at least 1, got {args.prefill} and {args.decode}"
        )
    return args.decode, args.prefill
