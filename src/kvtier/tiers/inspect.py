"""What a disk directory, a Redis server or an S3 bucket holds, and whether it is sound
(``kvtier inspect``): chunks, bytes, namespaces, ages; with ``verify``, every checksum."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tqdm import tqdm

from kvtier import codec
from kvtier.config import format_size
from kvtier.errors import CorruptChunk
from kvtier.keys import ChunkKey
from kvtier.sealing import Sealer
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.s3 import S3Tier
from kvtier.tiers.sealed import SealedTier


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
    sealed: int = 0  # chunks sealed at rest (kvtier.sealing)
    opened: bool = False  # they were opened and verified (a master key was given)
    bad: list[dict[str, str]] = field(default_factory=list)
    repaired: int = 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def inspect(
    tier: DiskTier | RedisTier | S3Tier,
    kind: str,
    location: str,
    verify: bool,
    repair: bool,
    sealer: Sealer | None = None,
) -> Report:
    """Count, size and check every chunk of ``tier`` (``verify``: read each whole and check
    its checksum; a sealed chunk is opened with ``sealer`` first, and is never bad without
    one); ``repair`` deletes the bad ones. A progress bar on stderr."""
    report = Report(kind, location, opened=verify and sealer is not None)
    # Opens sealed chunks as a server does (their tenant's epoch from the tier's keyring).
    opener = SealedTier(tier, sealer) if sealer is not None else None
    keys = list(tier.scan())
    namespaces: Counter[str] = Counter()
    times: list[float] = []
    for key in tqdm(keys, desc="inspect", unit="chunk", file=sys.stderr, disable=None):
        problem = _check(tier, key, verify, namespaces, times, report, opener)
        if problem is None:
            continue
        report.bad.append({"key": key.hex(), "problem": problem})
        if repair:
            report.repaired += int(tier.delete(key))
    report.chunks = len(keys)
    report.namespaces = dict(namespaces.most_common())
    report.verified = verify
    if times:
        report.oldest, report.newest = _iso(min(times)), _iso(max(times))
    return report


def _check(
    tier: DiskTier | RedisTier | S3Tier,
    key: ChunkKey,
    verify: bool,
    namespaces: Counter[str],
    times: list[float],
    report: Report,
    opener: SealedTier | None,
) -> str | None:
    """Account one chunk in the report; return what is wrong with it, or None."""
    try:
        head = tier.header_of(key, codec.HEADER_BYTES)
        if head is None:
            return None  # deleted meanwhile: not a corruption
        if bytes(head[:4]) == codec.SEALED_MAGIC:
            report.sealed += 1
            if not (verify and opener is not None):  # nothing to check it with
                namespaces[bytes(head[20:28]).hex()] += 1
                return None
        if verify:
            blob = tier.get_many([key])[0]
            if blob is None:
                return None
            if opener is not None and bytes(memoryview(blob)[:4]) == codec.SEALED_MAGIC:
                blob = opener.get_many([key])[0] or blob  # unopened: decode says why
            header = codec.decode(blob, expected_key=key).header
        else:
            header = codec.read_header(head)
            if header.key != key:
                raise CorruptChunk(f"chunk {header.key.hex()} stored under key {key.hex()}")
    except CorruptChunk as exc:
        return str(exc)
    namespaces[header.namespace_id or "(none)"] += 1
    times.append(header.created_at)
    report.bytes += codec.HEADER_BYTES + header.stored_bytes
    return None


def print_report(r: Report) -> None:
    print(f"{r.tier} tier at {r.location}")
    print(f"  chunks      {r.chunks}")
    print(f"  bytes       {r.bytes} ({format_size(r.bytes)})")
    print(f"  oldest      {r.oldest or '-'}")
    print(f"  newest      {r.newest or '-'}")
    print(f"  namespaces  {len(r.namespaces)}")
    for ns, n in r.namespaces.items():
        print(f"    {ns}  {n} chunks")
    if r.sealed:
        how = "opened and verified" if r.opened else "not opened (give --master-key-file)"
        print(f"  sealed      {r.sealed} chunks, {how}")
    checked = "checksums verified" if r.verified else "headers checked (add --verify)"
    print(f"  {checked}: {len(r.bad)} bad" + (f", {r.repaired} removed" if r.repaired else ""))
    for bad in r.bad:
        print(f"    {bad['key']}  {bad['problem']}")
