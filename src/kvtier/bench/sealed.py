"""``kvtier bench ttft --encrypt``: the disk and Redis hits again with chunks sealed at rest
(``kvtier serve --master-key-file``), and AES-256-GCM's speed on this host beside memcpy.

The sealed tiers hold the same chunks as the plain ones: the first server's chunks, sealed as a
server with that master key would have written them (no tenants: the one trust domain's key).
Each sealed hit is then read by a restarted server, the disk's after the page cache is dropped,
like its plain counterpart.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier.bench.common import NO_PREFIX_CACHE, copy_chunks, drop_page_cache
from kvtier.codec import HEADER_BYTES
from kvtier.errors import KvtierError
from kvtier.keys import ChunkKey
from kvtier.sealing import MasterKeys, Sealer, new_master_key
from kvtier.tiers import DiskTier, RedisTier
from kvtier.tiers.sealed import SealedTier

if TYPE_CHECKING:
    from kvtier.bench.ttft import _Run

SEALED_PREFIX = "sealed"  # the sealed copy's Redis keys (not under the plain "kvtier" prefix)
CHUNK_BYTES = 11_796_480 + HEADER_BYTES  # a 256-token chunk of the demo model in float32


def sealed_paths(bench: _Run, tiers: list[str], redis_url: str | None) -> None:
    """kvtier_disk_sealed and kvtier_redis_sealed, for the prompts the cold path stored."""
    key_file = bench.work / "master.key"
    key_file.write_text(new_master_key() + "\n")
    keys = MasterKeys.load(str(key_file))
    assert keys is not None
    sealer = Sealer(keys)
    fill = bench.fill
    sealing = ["--master-key-file", str(key_file), *NO_PREFIX_CACHE]
    if "disk" in tiers:
        plain = DiskTier(bench.work / "disk", 1 << 40, read_only=True)
        sealed_dir = bench.work / "disk_sealed"
        copy_chunks(plain, SealedTier(DiskTier(sealed_dir, 1 << 40, fsync=False), sealer))
        drop_page_cache()
        try:
            with bench.kvtier("--disk", str(sealed_dir), *sealing) as disk:
                bench.measure(disk, "kvtier_disk_sealed", fill, warm=1)
        except (KvtierError, OSError) as exc:  # a server that does not start fails its row
            for n in fill:
                bench.record(n, "kvtier_disk_sealed", [], str(exc))
    if "redis" in tiers and redis_url:
        plain_redis = RedisTier(redis_url, prefix="kvtier")
        copy_chunks(plain_redis, SealedTier(RedisTier(redis_url, prefix=SEALED_PREFIX), sealer))
        config = bench.work / "sealed_redis.yaml"  # the sealed copy's prefix
        config.write_text(
            json.dumps(
                {
                    "tiers": [
                        {"kind": "memory"},
                        {"kind": "redis", "url": redis_url, "prefix": SEALED_PREFIX},
                    ]
                }
            )
        )
        try:
            with bench.kvtier("--config", str(config), "--disk", "none", *sealing) as redis:
                bench.measure(redis, "kvtier_redis_sealed", fill, warm=1)
        except (KvtierError, OSError) as exc:
            for n in fill:
                bench.record(n, "kvtier_redis_sealed", [], str(exc))


def crypto_speed(nbytes: int = CHUNK_BYTES, repeat: int = 5) -> dict[str, float]:
    """GB/s of sealing and opening one chunk-sized value, and of copying it, on one core
    (best of ``repeat``)."""
    keys = MasterKeys.parse(new_master_key(), "bench")
    sealer = Sealer(keys)
    key = ChunkKey(os.urandom(16))
    value = bytearray(os.urandom(nbytes))
    dest = bytearray(nbytes)
    sealed = sealer.seal(key, value)

    def copy() -> None:
        dest[:] = value

    def seal() -> None:
        sealer.seal(key, value)

    def open_() -> None:
        assert sealer.open_into(key, sealed, [memoryview(dest)])

    return {
        name: nbytes / _best(fn, repeat) / 1e9
        for name, fn in (("memcpy", copy), ("seal", seal), ("open", open_))
    }


def _best(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def print_sealed(result: dict[str, Any], lengths: list[int]) -> None:
    """The sealed hits against the plain ones, and the cipher's speed."""
    speed = result.get("crypto_gb_s")
    if not speed:
        return
    print(
        f"  AES-256-GCM here, one core: seal {speed['seal']:.2f} GB/s, open"
        f" {speed['open']:.2f} GB/s; memcpy {speed['memcpy']:.2f} GB/s (a {CHUNK_BYTES >> 20}"
        " MiB chunk)"
    )
    ttft = {(r["tokens"], r["path"]): r["ttft_s"] for r in result["rows"]}
    for n in lengths:
        parts = []
        for tier in ("disk", "redis"):
            plain, sealed = ttft.get((n, f"kvtier_{tier}")), ttft.get((n, f"kvtier_{tier}_sealed"))
            if plain and sealed:
                parts.append(f"{tier} {sealed / plain:.2f}x (target <= 1.10x)")
        if parts:
            print(f"  {n} tokens, sealed at rest / plain: " + "; ".join(parts))


def sealed_store_spec(work: Path) -> dict[str, str]:
    """The no-reuse overhead's store settings with sealing (a key file in ``work``)."""
    key_file = work / "overhead_master.key"
    if not key_file.exists():
        key_file.write_text(new_master_key() + "\n")
    return {"master_key_file": str(key_file)}
