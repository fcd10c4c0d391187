"""``kvtier bench ttft --codec NAME``: the disk and Redis hits again with the chunks stored in a
codec (``kvtier serve --codec TIER=NAME``), beside the raw ones, and the codec's decode speed
beside each tier's raw read speed, in the same run.

The codec's tiers hold the same chunks as the raw ones: the first server's chunks, recoded as a
server with that codec's write-behind queue would have stored them. Each is then read by a
restarted server started with ``--codec TIER=NAME`` (the disk's after the page cache is
dropped), like its raw counterpart. The server is started with ``--force-codec``: a time to
first token does not depend on the codec's quality, which ``kvtier bench fidelity`` measures
(the output says so).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from kvtier import codec as chunk_codec
from kvtier.bench.common import NO_PREFIX_CACHE, copy_chunks, drop_page_cache
from kvtier.codec import Compression
from kvtier.errors import KvtierError
from kvtier.recode import recode as recode_chunk
from kvtier.tiers import DiskTier, RedisTier, Tier
from kvtier.tiers.base import Blob

if TYPE_CHECKING:
    from kvtier.bench.ttft import _Run

TARGET = 1.6  # a codec's disk and Redis hits against vLLM's own prefix hit (issue 24)


def codec_paths(bench: _Run, tiers: list[str], redis_url: str | None, name: str) -> dict[str, Any]:
    """kvtier_disk_NAME and kvtier_redis_NAME, for the prompts the cold path stored; returns
    what the recoding measured (stored bytes against raw, decode GB/s)."""
    compression = Compression.named(name)
    fill = bench.fill
    coding = ["--force-codec", *NO_PREFIX_CACHE]
    info: dict[str, Any] = {"name": name, "raw_bytes": 0, "stored_bytes": 0, "decode_gb_s": None}
    if "disk" in tiers:
        plain = DiskTier(bench.work / "disk", 1 << 40, read_only=True)
        coded_dir = bench.work / f"disk_{name}"
        _recode(plain, DiskTier(coded_dir, 1 << 40, fsync=False), compression, info)
        drop_page_cache()
        try:
            with bench.kvtier("--disk", str(coded_dir), "--codec", f"disk={name}", *coding) as s:
                bench.measure(s, f"kvtier_disk_{name}", fill, warm=1)
        except (KvtierError, OSError) as exc:  # a server that does not start fails its row
            for n in fill:
                bench.record(n, f"kvtier_disk_{name}", [], str(exc))
    if "redis" in tiers and redis_url:
        prefix = f"coded_{name}"  # the coded copy's keys, not under the raw "kvtier" prefix
        plain_redis = RedisTier(redis_url, prefix="kvtier")
        _recode(plain_redis, RedisTier(redis_url, prefix=prefix), compression, info)
        config = bench.work / f"redis_{name}.yaml"
        redis_tier = {"kind": "redis", "url": redis_url, "prefix": prefix}
        config.write_text(json.dumps({"tiers": [{"kind": "memory"}, redis_tier]}))
        options = ["--config", str(config), "--disk", "none", "--codec", f"redis={name}"]
        try:
            with bench.kvtier(*options, *coding) as s:
                bench.measure(s, f"kvtier_redis_{name}", fill, warm=1)
        except (KvtierError, OSError) as exc:
            for n in fill:
                bench.record(n, f"kvtier_redis_{name}", [], str(exc))
    return info


def _recode(source: Tier, coded: Tier, compression: Compression, info: dict[str, Any]) -> None:
    """Every chunk of ``source`` into ``coded``, stored with ``compression``; both closed. The
    bytes before and after go to ``info``, with the decode speed of the largest coded chunk."""
    largest: list[Blob] = [b""]

    def recode(value: Blob) -> Blob:
        stored = recode_chunk(value, compression)
        info["raw_bytes"] += memoryview(value).nbytes
        info["stored_bytes"] += memoryview(stored).nbytes
        largest[0] = max(largest[0], stored, key=lambda b: memoryview(b).nbytes)
        return stored

    copy_chunks(source, coded, recode)
    if memoryview(largest[0]).nbytes:
        info["decode_gb_s"] = _decode_gb_s(largest[0])


def _decode_gb_s(stored: Blob, repeat: int = 3) -> float:
    """GB/s of the engine's raw KV produced by decoding ``stored`` (checksum included), one
    thread, best of ``repeat``."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        chunk = chunk_codec.decode(stored).chunk
        best = min(best, time.perf_counter() - started)
    return chunk.nbytes / best / 1e9


def print_codec(result: dict[str, Any], lengths: list[int]) -> None:
    """The codec's hits against vLLM's prefix hit and the raw hits, and its decode speed
    beside each tier's raw read speed."""
    info = result.get("codec")
    if not info:
        return
    name = info["name"]
    ratio = info["stored_bytes"] / info["raw_bytes"] if info["raw_bytes"] else None
    decode = info.get("decode_gb_s")
    line = f"  codec {name}: the lower tiers' chunks recoded from the raw ones"
    if ratio is not None:
        line += f", {ratio:.3f}x their bytes"
    if decode:
        line += f"; decode {decode:.2f} GB/s of raw KV (one thread)"
    print(line + "; the servers ran with --force-codec (quality: `kvtier bench fidelity`)")
    ttft = {(r["tokens"], r["path"]): r["ttft_s"] for r in result["rows"]}
    for n in lengths:
        prefix = ttft.get((n, "vllm_prefix"))
        parts = []
        for tier in ("disk", "redis"):
            raw, coded = ttft.get((n, f"kvtier_{tier}")), ttft.get((n, f"kvtier_{tier}_{name}"))
            if coded and prefix:
                parts.append(f"{tier} {coded / prefix:.2f}x vllm_prefix (target <= {TARGET}x)")
            if coded and raw:
                parts.append(f"{tier} {coded / raw:.2f}x raw")
        read = _read_gb_s(result, n)
        parts += [f"raw {what} {gb:.2f} GB/s" for what, gb in read.items()]
        if parts:
            print(f"  {n} tokens, {name}: " + "; ".join(parts))


def _read_gb_s(result: dict[str, Any], n: int) -> dict[str, float]:
    """The raw media's read speeds at ``n`` tokens: the hit's bytes over the raw read's time."""
    raw = result["raw"].get(n) or result["raw"].get(str(n)) or {}
    out = {}
    for what, key in (("disk cold read", "disk_cold_read_s"), ("Redis GETs", "redis_get_s")):
        seconds, nbytes = raw.get(key), raw.get(key[:-2] + "_bytes")
        if seconds and nbytes:
            out[what] = nbytes / seconds / 1e9
    return out


def codec_order(path: str, order: list[str]) -> float:
    """Where a path sorts among ``order``: a codec's row just after its raw one."""
    if path in order:
        return order.index(path)
    base = "_".join(path.split("_")[:2])
    return order.index(base) + 0.5 if base in order else len(order)


def coded_store_spec(store: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The no-reuse overhead's store with its disk tier stored in codec ``name``."""
    if not name:
        return store
    tiers = [dict(t, compression=name) if t["kind"] == "disk" else t for t in store["tiers"]]
    return {**store, "tiers": tiers}
