"""``kvtier inspect``: what a disk directory, a Redis server or an S3 bucket holds, and whether
it is sound.

Read-only unless ``--repair``: it opens the disk tier read-only (no temp-file clean-up, no
mtime updates) and only reads from Redis and S3 (objects of the prefix only). With
``--verify`` every chunk is read in full and its checksum checked; bad chunks are listed and
the exit status is 1. ``--repair`` deletes the bad chunks (and, on disk, temp files left by
dead writers).

Chunks sealed at rest (``kvtier serve --master-key-file``) are counted as sealed; with
``--master-key-file`` and ``--verify`` each is opened and checked too (one that does not open
is bad). Without the key they are never called bad, so ``--repair`` leaves them alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from kvtier.config import MASTER_KEY_VAR, S3TierConfig
from kvtier.errors import ConfigError
from kvtier.factory import open_s3_tier
from kvtier.sealing import MasterKeys, Sealer
from kvtier.tier_config import s3_location
from kvtier.tiers import DiskTier, RedisTier, S3Tier
from kvtier.tiers.inspect import inspect, print_report


def register(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="count, size and verify the chunks of a disk directory or Redis server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--disk", metavar="DIR", help="a disk tier's directory")
    where.add_argument("--redis", metavar="URL", help="a Redis/Valkey server, redis://host:port/db")
    where.add_argument(
        "--s3",
        metavar="URL",
        help="an object tier: http://HOST:PORT/BUCKET[/PREFIX] or s3://BUCKET[/PREFIX]"
        " (credentials from the AWS environment)",
    )
    p.add_argument(
        "--prefix",
        default="kvtier",
        help="redis, s3: key prefix (kvtier; s3: the URL's)",
    )
    p.add_argument("--cluster", action="store_true", help="redis: the URL is a Redis Cluster")
    p.add_argument("--verify", action="store_true", help="read every chunk and check it")
    p.add_argument("--repair", action="store_true", help="delete the bad chunks found")
    p.add_argument(
        "--master-key-file",
        metavar="FILE",
        help="the master keys the chunks were sealed with (or set KVTIER_MASTER_KEY)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    env = MASTER_KEY_VAR if os.environ.get(MASTER_KEY_VAR) and not args.master_key_file else ""
    keys = MasterKeys.load(args.master_key_file or "", env)
    tier: DiskTier | RedisTier | S3Tier
    if args.s3:
        try:
            found = {"prefix": args.prefix, **s3_location(args.s3)}
            config = S3TierConfig(**found)  # type: ignore[arg-type]
            tier = open_s3_tier(config, read_only=not args.repair, must_list=True)
        except (ConfigError, OSError) as exc:
            print(f"kvtier inspect: --s3: {exc}", file=sys.stderr)
            return 2
        kind, location = "s3", args.s3
    elif args.disk:
        try:
            # Capacity only matters for writes, which inspect never makes.
            tier = DiskTier(args.disk, capacity=2**62, read_only=not args.repair)
        except FileNotFoundError:
            print(f"kvtier inspect: no such directory: {args.disk}", file=sys.stderr)
            return 2
        kind, location = "disk", str(tier.root)
    else:
        tier = RedisTier(args.redis, prefix=args.prefix, cluster=args.cluster)
        kind, location = "redis", args.redis
    try:
        sealer = Sealer(keys) if keys is not None else None
        report = inspect(tier, kind, location, args.verify, args.repair, sealer)
    finally:
        tier.close()
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print_report(report)
    return 1 if report.bad and not args.repair else 0
