"""``kvtier bench store``: the store's put/get throughput next to the raw medium, in one run.

For each tier the same chunks go through kvtier and through the plainest use of the medium.
kvtier's put is ``store.put`` (encode + checksum + write); its get is ``store.get_into``
(lookup + read into preallocated destination buffers + verify), the path a connector uses.

- memory: numpy memcpy of the same bytes into the same kind of preallocated buffers;
- disk:   one plain file per chunk, written and read the way the disk tier writes and reads
          its chunks (O_DIRECT writes + fsync, then preadv into the buffers on as many threads
          as the tier reads with), so that both read from the device in either mode;
- redis:  plain redis-py SET / GET of the same byte strings, one call per chunk;
- s3:     plain PUTs and GETs of the same objects with the tier's own client, as many in
          flight as the tier sends (a private SeaweedFS on loopback unless ``--s3-url``).

Repeats are interleaved (ours, raw, ours, raw...) and the best of each is reported, so noise
on this shared machine hits both sides alike. Ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from tqdm import tqdm

from kvtier.bench import codecs, raw_io
from kvtier.codec import DTYPES, KVChunk
from kvtier.integrations.engine_dtype import host_dtype
from kvtier.integrations.engine_layout import has_gpu
from kvtier.keys import Namespace
from kvtier.quant import LOSSY
from kvtier.redis_process import RedisServer
from kvtier.store import TieredStore
from kvtier.tiers import DiskTier, MemoryTier, RedisTier, S3Tier

S3_CONCURRENCY = 8  # the tier's default

SMOLLM2 = (30, 2, 256, 3, 64)  # 256 tokens of SmolLM2-135M: 5,898,240 bytes in bf16
KV_DTYPES = ("bfloat16", "float16", "float32")  # what an engine stores (bytes: codec.DTYPES)
TARGETS = {"memory": 0.7, "disk": 0.7, "redis": 0.8, "s3": 0.8}
RAW = {
    "memory": "numpy memcpy into preallocated buffers",
    "disk": "a file per chunk: O_DIRECT write + fsync, parallel O_DIRECT reads (as the tier)",
    "redis": "plain redis-py SET/GET, one call per chunk",
    "s3": f"plain S3 PUT/GET of the same objects, same client, {S3_CONCURRENCY} in flight",
}


@dataclass
class BenchResult:
    tier: str
    chunk_bytes: int
    chunks: int
    total_bytes: int
    repeat: int
    put_gbps: float
    get_gbps: float
    raw_put_gbps: float
    raw_get_gbps: float
    put_ratio: float
    get_ratio: float
    get_target: float
    raw: str
    get_view_gbps: float | None = None  # memory: store.get, zero-copy views of the tier
    cold: bool = False
    kv_dtype: str = "bfloat16"
    host: str = ""  # the CPU and how the dtype was chosen


def _shape_for(chunk_mb: float | None, dtype: str) -> tuple[int, ...]:
    layers, kv, tokens, heads, dim = SMOLLM2
    if chunk_mb is not None:
        per_head = layers * kv * tokens * dim * DTYPES[dtype][1]
        heads = max(1, round(chunk_mb * 1e6 / per_head))
    return (layers, kv, tokens, heads, dim)


def _workload(
    chunk_mb: float | None, total_mb: float, dtype: str
) -> tuple[np.ndarray, list[KVChunk], int]:
    shape = _shape_for(chunk_mb, dtype)
    itemsize = DTYPES[dtype][1]
    bits = np.dtype(f"<u{itemsize}")  # random bits of the value's width
    chunk_bytes = int(np.prod(shape)) * itemsize
    n = max(1, round(total_mb * 1e6 / chunk_bytes))
    rng = np.random.default_rng(0)
    # Random bits: incompressible, as KV is to the lossless codecs (a float32 NaN pattern is
    # as good as any other value to the store, which moves and checksums bytes).
    top = 2 ** (8 * itemsize)
    chunks = [
        KVChunk.from_array(rng.integers(0, top, size=shape, dtype=bits), dtype) for _ in range(n)
    ]
    tokens = rng.integers(0, 49152, size=n * shape[2], dtype=np.uint32)
    return tokens, chunks, chunk_bytes


def _timed(fn: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@contextmanager
def _redis_url(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1 or (args.chunk_mb is not None and args.chunk_mb <= 0) or args.total_mb <= 0:
        raise SystemExit("kvtier bench store: --repeat, --chunk-mb and --total-mb must be > 0")
    if not args.tier and not args.codec:
        raise SystemExit("kvtier bench store: give --tier, --codec or both")
    choice = host_dtype(args.dtype, has_gpu())
    dtype = choice.kv_dtype
    names: list[str] = []
    if args.codec:
        names = list(LOSSY) if args.codec == "all" else args.codec.split(",")
        unknown = [n for n in names if n not in LOSSY]
        if unknown:
            raise SystemExit(
                f"kvtier bench store: unknown codec {unknown[0]!r}; codecs: all, "
                + ", ".join(LOSSY)
            )
    table = codecs.measure(names, dtype, max(args.repeat, 5)) if args.codec else None
    if table is not None and not args.json:
        codecs.print_table(table)
    if not args.tier:
        if args.json:
            print(json.dumps(table))
        return 0
    tokens, chunks, chunk_bytes = _workload(args.chunk_mb, args.total_mb, dtype)
    total = chunk_bytes * len(chunks)
    ns = Namespace("bench/smollm2-shaped", kv_dtype=dtype)
    progress = tqdm(
        total=args.repeat, desc=f"bench {args.tier}", unit="round", file=sys.stderr, disable=None
    )
    runner = {
        "memory": _bench_memory,
        "disk": _bench_disk,
        "redis": _bench_redis,
        "s3": _bench_s3,
    }[args.tier]
    best = runner(args, tokens, chunks, ns, progress)
    progress.close()
    gb = total / 1e9
    result = BenchResult(
        tier=args.tier,
        chunk_bytes=chunk_bytes,
        chunks=len(chunks),
        total_bytes=total,
        repeat=args.repeat,
        put_gbps=gb / best["put"],
        get_gbps=gb / best["get"],
        raw_put_gbps=gb / best["raw_put"],
        raw_get_gbps=gb / best["raw_get"],
        put_ratio=best["raw_put"] / best["put"],
        get_ratio=best["raw_get"] / best["get"],
        get_target=TARGETS[args.tier],
        raw=RAW[args.tier],
        get_view_gbps=gb / best["get_view"] if "get_view" in best else None,
        cold=bool(args.cold and args.tier == "disk"),
        kv_dtype=dtype,
        host=choice.summary(),
    )
    if args.json:
        print(json.dumps({**asdict(result), "codecs": table} if table else asdict(result)))
    else:
        _print_table(result)
    return 0


def _print_table(r: BenchResult) -> None:
    print(
        f"kvtier bench store: tier {r.tier}, {r.chunks} chunks of {r.chunk_bytes / 1e6:.1f} MB"
        f" ({r.total_bytes / 1e9:.2f} GB) of {r.kv_dtype} KV, best of {r.repeat}"
        f"{' (cold reads)' if r.cold else ''}"
    )
    print(f"  measured on: {r.host}")
    print(f"  {'':<12}{'put GB/s':>10}{'get GB/s':>10}")
    print(f"  {'kvtier':<12}{r.put_gbps:>10.2f}{r.get_gbps:>10.2f}")
    print(f"  {'raw medium':<12}{r.raw_put_gbps:>10.2f}{r.raw_get_gbps:>10.2f}   ({r.raw})")
    ok = "ok" if r.get_ratio >= r.get_target else "BELOW TARGET"
    print(
        f"  {'ratio':<12}{r.put_ratio:>10.2f}{r.get_ratio:>10.2f}   (get target >="
        f" {r.get_target}: {ok})"
    )
    if r.get_view_gbps is not None:
        print(
            f"  store.get (zero-copy views of the DRAM tier, verified): {r.get_view_gbps:.2f} GB/s"
        )


Timings = dict[str, float]


def _get_into(
    store: TieredStore, tokens: np.ndarray, ns: Namespace, dests: list[np.ndarray]
) -> Callable[[], None]:
    def get() -> None:
        loaded = store.get_into(tokens, ns, dests)
        assert loaded.chunks == len(dests), f"the store lost chunks ({loaded.chunks} loaded)"

    return get


def _keep_best(best: Timings, name: str, seconds: float) -> None:
    best[name] = min(best.get(name, float("inf")), seconds)


def _bench_memory(
    args: argparse.Namespace,
    tokens: np.ndarray,
    chunks: list[KVChunk],
    ns: Namespace,
    progress: tqdm,
) -> Timings:
    best: Timings = {}
    sources = [c.numpy() for c in chunks]
    dests = [np.empty_like(s) for s in sources]
    capacity = sum(c.nbytes for c in chunks) * 2

    def memcpy() -> None:
        for dest, source in zip(dests, sources, strict=True):
            np.copyto(dest, source)

    for _ in range(args.repeat):
        with TieredStore([MemoryTier(capacity)], chunk_tokens=chunks[0].tokens) as store:
            _keep_best(best, "put", _timed(store.put, tokens, ns, chunks))
            _keep_best(best, "raw_put", _timed(memcpy))

            def get_view(s: TieredStore = store) -> None:
                got = s.get(tokens, ns)
                assert len(got.chunks) == len(chunks), "memory tier lost chunks in the benchmark"

            _keep_best(best, "get", _timed(_get_into(store, tokens, ns, dests)))
            _keep_best(best, "raw_get", _timed(memcpy))
            _keep_best(best, "get_view", _timed(get_view))
        progress.update()
    return best


def _bench_disk(
    args: argparse.Namespace,
    tokens: np.ndarray,
    chunks: list[KVChunk],
    ns: Namespace,
    progress: tqdm,
) -> Timings:
    best: Timings = {}
    dests = [np.empty(c.nbytes, dtype=np.uint8) for c in chunks]
    parent = Path(args.dir).expanduser() if args.dir else Path("~/.cache/kvtier").expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=parent))
    fsync = not args.no_fsync
    capacity = sum(c.nbytes for c in chunks) * 2
    chunk_tokens = chunks[0].tokens
    try:
        for r in range(args.repeat):
            store_dir, raw_dir = work / f"store{r}", work / f"raw{r}"
            raw_dir.mkdir()

            def put(d: Path = store_dir) -> None:
                with TieredStore([DiskTier(d, capacity, fsync=fsync)], chunk_tokens) as s:
                    s.put(tokens, ns, chunks)

            def raw_put(d: Path = raw_dir) -> None:
                paths = [d / f"{i}.bin" for i in range(len(chunks))]
                raw_io.write_direct(paths, [c.data for c in chunks], fsync)

            _keep_best(best, "put", _timed(put))
            _keep_best(best, "raw_put", _timed(raw_put))
            store = TieredStore([DiskTier(store_dir, capacity, fsync=fsync)], chunk_tokens)
            raw_files = [raw_dir / f"{i}.bin" for i in range(len(chunks))]
            if args.cold:
                raw_io.drop_cached([p for p in store_dir.rglob("*.kvc")] + raw_files)

            def raw_get(files: list[Path] = raw_files) -> None:
                raw_io.read_parallel(files, dests)

            _keep_best(best, "get", _timed(_get_into(store, tokens, ns, dests)))
            _keep_best(best, "raw_get", _timed(raw_get))
            store.close()
            shutil.rmtree(store_dir)
            shutil.rmtree(raw_dir)
            progress.update()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return best


def _bench_redis(
    args: argparse.Namespace,
    tokens: np.ndarray,
    chunks: list[KVChunk],
    ns: Namespace,
    progress: tqdm,
) -> Timings:
    best: Timings = {}
    payloads = [bytes(c.data) for c in chunks]
    dests = [np.empty(c.nbytes, dtype=np.uint8) for c in chunks]
    with _redis_url(args.redis) as url:
        client = redis.Redis.from_url(url)
        prefix = f"kvtier-bench-{os.getpid()}"
        try:
            for _ in range(args.repeat):
                tier = RedisTier(url, prefix=prefix)
                with TieredStore([tier], chunk_tokens=chunks[0].tokens) as store:
                    _keep_best(best, "put", _timed(store.put, tokens, ns, chunks))

                    def raw_put() -> None:
                        for i, p in enumerate(payloads):
                            client.set(f"{prefix}-raw:{i}", p)

                    def raw_get() -> None:
                        for i in range(len(payloads)):
                            client.get(f"{prefix}-raw:{i}")

                    _keep_best(best, "raw_put", _timed(raw_put))
                    _keep_best(best, "get", _timed(_get_into(store, tokens, ns, dests)))
                    _keep_best(best, "raw_get", _timed(raw_get))
                    for key in list(tier.scan()):
                        tier.delete(key)
                    client.delete(*[f"{prefix}-raw:{i}" for i in range(len(payloads))])
                progress.update()
        finally:
            client.close()
    return best


def _bench_s3(
    args: argparse.Namespace,
    tokens: np.ndarray,
    chunks: list[KVChunk],
    ns: Namespace,
    progress: tqdm,
) -> Timings:
    from kvtier.bench.s3_paths import client_for, object_store

    best: Timings = {}
    dests = [np.empty(c.nbytes, dtype=np.uint8) for c in chunks]
    with object_store(getattr(args, "s3_url", None)) as url, ThreadPoolExecutor(8) as pool:
        client = client_for(url)
        prefix = f"kvtier-bench-{os.getpid()}"
        try:
            for r in range(args.repeat):
                tier = S3Tier(client_for(url), 1 << 40, prefix=f"{prefix}-{r}")
                with TieredStore([tier], chunk_tokens=chunks[0].tokens) as store:
                    _keep_best(best, "put", _timed(store.put, tokens, ns, chunks))
                    names = [tier.object_name(k) for k in store.keys(tokens, ns)]
                    blobs = [client.get(n) or b"" for n in names]  # the objects, as stored
                    raw = [f"{prefix}-raw-{r}/{i}" for i in range(len(names))]

                    _keep_best(best, "raw_put", _timed(_s3_puts, pool, client, raw, blobs))
                    _keep_best(best, "get", _timed(_get_into(store, tokens, ns, dests)))
                    _keep_best(best, "raw_get", _timed(_s3_gets, pool, client, names, dests))
                    for name in names + raw:
                        client.delete(name)
                progress.update()
        finally:
            client.close()
    return best


def _s3_puts(pool: ThreadPoolExecutor, client: Any, names: list[str], blobs: list[Any]) -> None:
    list(pool.map(client.put, names, blobs))


def _s3_gets(
    pool: ThreadPoolExecutor, client: Any, names: list[str], dests: list[np.ndarray]
) -> None:
    list(pool.map(lambda n, d: client.get_into(n, [memoryview(d)]), names, dests))
