"""``kvtier inspect``: what a disk directory or a Redis server holds, and whether it is sound.

Read-only unless ``--repair``: it opens the disk tier read-only (no temp-file clean-up, no
mtime updates) and only reads from Redis. With ``--verify`` every chunk is read in full and
its checksum checked; bad chunks are listed and the exit status is 1. ``--repair`` deletes
the bad chunks (and, on disk, temp files left by dead writers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from kvtier import codec
from kvtier.config import format_size
from kvtier.errors import CorruptChunk
from kvtier.keys import ChunkKey
from kvtier.tiers import DiskTier, RedisTier


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
    p.add_argument("--prefix", default="kvtier", help="redis: key prefix (default kvtier)")
    p.add_argument("--cluster", action="store_true", help="redis: the URL is a Redis Cluster")
    p.add_argument("--verify", action="store_true", help="read every chunk and check it")
    p.add_argument("--repair", action="store_true", help="delete the bad chunks found")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


@dataclass
class Report:
    tier: str
    location: str
    chunks: int = 0
    bytes: int = 0
    namespaces: dict[str, int] = field(default_factory=dict)
    oldest: str | None = None
    newest: str | None = None
    verified: bool = False
    bad: list[dict[str, str]] = field(default_factory=list)
    repaired: int = 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def run(args: argparse.Namespace) -> int:
    tier: DiskTier | RedisTier
    if args.disk:
        try:
            # Capacity only matters for writes, which inspect never makes.
            tier = DiskTier(args.disk, capacity=2**62, read_only=not args.repair)
        except FileNotFoundError:
            print(f"kvtier inspect: no such directory: {args.disk}", file=sys.stderr)
            return 2
        report = Report("disk", str(tier.root))
    else:
        tier = RedisTier(args.redis, prefix=args.prefix, cluster=args.cluster)
        report = Report("redis", args.redis)
    try:
        keys = list(tier.scan())
        namespaces: Counter[str] = Counter()
        times: list[float] = []
        for key in tqdm(keys, desc="inspect", unit="chunk", file=sys.stderr, disable=None):
            problem = _check(tier, key, args.verify, namespaces, times, report)
            if problem is None:
                continue
            report.bad.append({"key": key.hex(), "problem": problem})
            if args.repair:
                report.repaired += int(tier.delete(key))
        report.chunks = len(keys)
        report.namespaces = dict(namespaces.most_common())
        report.verified = bool(args.verify)
        if times:
            report.oldest, report.newest = _iso(min(times)), _iso(max(times))
    finally:
        tier.close()
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        _print(report)
    return 1 if report.bad and not args.repair else 0


def _check(
    tier: DiskTier | RedisTier,
    key: ChunkKey,
    verify: bool,
    namespaces: Counter[str],
    times: list[float],
    report: Report,
) -> str | None:
    """Account one chunk in the report; return what is wrong with it, or None."""
    try:
        if verify:
            blob = tier.get_many([key])[0]
            if blob is None:
                return None  # deleted meanwhile: not a corruption
            header = codec.decode(blob, expected_key=key).header
        else:
            head = tier.header_of(key, codec.HEADER_BYTES)
            if head is None:
                return None
            header = codec.read_header(head)
            if header.key != key:
                raise CorruptChunk(f"chunk {header.key.hex()} stored under key {key.hex()}")
    except CorruptChunk as exc:
        return str(exc)
    namespaces[header.namespace_id or "(none)"] += 1
    times.append(header.created_at)
    report.bytes += codec.HEADER_BYTES + header.stored_bytes
    return None


def _print(r: Report) -> None:
    print(f"{r.tier} tier at {r.location}")
    print(f"  chunks      {r.chunks}")
    print(f"  bytes       {r.bytes} ({format_size(r.bytes)})")
    print(f"  oldest      {r.oldest or '-'}")
    print(f"  newest      {r.newest or '-'}")
    print(f"  namespaces  {len(r.namespaces)}")
    for ns, n in r.namespaces.items():
        print(f"    {ns}  {n} chunks")
    checked = "checksums verified" if r.verified else "headers checked (add --verify)"
    print(f"  {checked}: {len(r.bad)} bad" + (f", {r.repaired} removed" if r.repaired else ""))
    for bad in r.bad:
        print(f"    {bad['key']}  {bad['problem']}")
