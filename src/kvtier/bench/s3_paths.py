"""``kvtier bench ttft``'s object-storage path: ``kvtier_s3``, a restarted server (DRAM + S3,
no disk, no Redis) whose only copy of the context is what the first server uploaded to the
bucket, beside the raw GETs of the same objects with the same client and concurrency.

The store is a private SeaweedFS on loopback (``--s3-url`` names another; its credentials then
come from the AWS environment). Its keys reach the servers through the environment, as
``kvtier pod --s3 local`` hands them to its engines.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kvtier.bench.common import NO_PREFIX_CACHE, same_bytes
from kvtier.factory import s3_region
from kvtier.seaweed_process import SeaweedFS
from kvtier.tier_config import s3_location
from kvtier.tiers.s3_client import S3Client
from kvtier.tiers.s3_credentials import load_credentials

if TYPE_CHECKING:
    from kvtier.bench.ttft import _Run

TARGET_OVER_COLD = 5.0  # kvtier_s3 at 8,000 tokens against cold (issue 25)
PREFIX = "kvtier"  # what `kvtier serve --s3 URL` stores under by default


@contextmanager
def object_store(url: str | None) -> Iterator[str]:
    """``url``, or a private SeaweedFS's, its credentials in this process's environment for
    the servers it starts."""
    if url:
        yield url
        return
    with SeaweedFS() as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server.url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def client_for(url: str) -> S3Client:
    where = s3_location(url)
    return S3Client(where["endpoint"], where["bucket"], s3_region(), load_credentials(), 10.0)


def s3_path(bench: _Run, url: str) -> None:
    """kvtier_s3 for the prompts the cold path stored, then raw GETs of as many objects."""
    with bench.kvtier("--disk", "none", "--s3", url, *NO_PREFIX_CACHE) as server:
        bench.measure(server, "kvtier_s3", bench.fill, warm=1)
    client = client_for(url)
    prefix = (s3_location(url).get("prefix") or PREFIX) + "/v1/"
    objects = [(name, size) for name, size, _ in client.list(prefix)]
    for n in bench.fill:
        names = same_bytes(objects, bench.loaded_tokens(n, "kvtier_s3"))
        bench.raw[n]["s3_get_s"] = raw_gets_s(client, names) if names else None
        sizes = dict(objects)
        bench.raw[n]["s3_get_bytes"] = sum(sizes[name] for name in names)
    client.close()


def raw_gets_s(client: S3Client, names: list[str], concurrency: int = 8) -> float:
    """Seconds to GET ``names`` into buffers, ``concurrency`` at a time (the tier's own)."""
    buffers = {name: bytearray(client.head(name) or 0) for name in names}
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        list(pool.map(lambda name: client.get_into(name, [memoryview(buffers[name])]), names))
        return time.perf_counter() - start


def print_s3(result: dict[str, Any], lengths: list[int]) -> None:
    ttft = {(r["tokens"], r["path"]): r["ttft_s"] for r in result["rows"]}
    for n in lengths:
        hit, cold = ttft.get((n, "kvtier_s3")), ttft.get((n, "cold"))
        if not hit:
            continue
        parts = [f"{cold / hit:.1f}x faster than cold" if cold else "cold failed"]
        if ttft.get((n, "kvtier_redis")):
            parts.append(f"{hit / ttft[(n, 'kvtier_redis')]:.2f}x kvtier_redis")
        raw = result["raw"].get(n) or result["raw"].get(str(n)) or {}
        memory, base = ttft.get((n, "kvtier_memory")), raw.get("s3_get_s")
        if memory and base:
            parts.append(
                f"s3 - memory = {hit - memory:.3f}s = {(hit - memory) / base:.1f}x the raw GETs"
                f" ({base:.3f}s for {raw.get('s3_get_bytes', 0) / 1e6:.0f} MB, 8 in flight)"
            )
        print(
            f"  {n} tokens, kvtier_s3 (SeaweedFS on this host unless --s3-url): " + "; ".join(parts)
        )
