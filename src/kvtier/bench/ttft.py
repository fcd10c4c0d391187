"""``kvtier bench ttft``: time to first token as users see it, with and without kvtier.

Every request goes over HTTP to a real server (``kvtier serve``, or vLLM's own server with the
same flags), the engine in processes of its own laid out as ``kvtier serve`` lays them out (the
output says where the model ran), as in production. Prompts are
random token ids of the given lengths (by default not multiples of vLLM's 128-token blocks or
kvtier's 256-token chunks), sent with ``max_tokens=1``: the response time is the TTFT. Paths,
side by side in one run:

- cold_vllm:         a plain vLLM server (no connector), nothing cached;
- cold:              the kvtier server, nothing cached (its chunks are saved meanwhile);
- vllm_prefix:       the cold_vllm prompt again in the plain server, from vLLM's own prefix
                     cache (in a kvtier server kvtier would load the tail after vLLM's
                     last whole block: not vLLM's own reuse any more);
- kvtier_memory:     a kvtier server with vLLM's prefix cache off: the hit comes from DRAM;
- kvtier_disk:       a restarted kvtier server (DRAM + disk, the serve default) reading chunks
                     the first server wrote; the page cache is dropped first when this process
                     may (root), and every repeat reads a distinct prompt whose files were
                     never read, so each hit reads the device;
- kvtier_redis:      a restarted kvtier server (DRAM + Redis) reading what the first one wrote;
- kvtier_s3:         a restarted kvtier server (DRAM + S3, no disk) reading what the first one
                     uploaded to a private SeaweedFS (or ``--s3-url``): :mod:`.s3_paths`;
- kvtier_disk_sealed, kvtier_redis_sealed (``--encrypt``): the same hits, the chunks sealed at
                     rest (AES-256-GCM, ``kvtier serve --master-key-file``); the no-reuse
                     overhead is then measured with the disk tier sealed, and AES-GCM's speed
                     printed beside memcpy's;
- kvtier_disk_NAME, kvtier_redis_NAME (``--codec NAME``): the same hits, the chunks stored in
                     that codec (``kvtier serve --codec TIER=NAME``); its decode speed is
                     printed beside the raw read speed of each tier (:mod:`.codec_paths`);
- example_connector: vLLM's ExampleConnector, written by one server and read by a restarted one
                     (its failures are recorded for that length).

``recomputed_tokens`` is what the engine computed of the prompt (vLLM's usage report:
prompt tokens minus cached tokens). Medians of ``--repeat`` requests, after one request of each
length per kvtier server not counted (``warm_up_s``), as vLLM's prefix hits follow its cold
requests: a fresh server's first requests carry one-time costs (README, "Dense context"). The
no-reuse overhead (kvtier's cost when nothing is reused) is measured in one engine process:
rounds of distinct prompts with the connector working and bypassed, paired and alternating
(identical engine processes differ by several percent here, rounds in one by about one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvtier.bench import raw_io
from kvtier.bench.codec_paths import codec_order, codec_paths, coded_store_spec, print_codec
from kvtier.bench.common import NO_PREFIX_CACHE, SERVE_OPTIONS, drop_page_cache, prompt, same_bytes
from kvtier.bench.example import example_paths
from kvtier.bench.s3_paths import object_store, print_s3, s3_path
from kvtier.bench.sealed import crypto_speed, print_sealed, sealed_paths, sealed_store_spec
from kvtier.bench.ttft_worker import MARK
from kvtier.errors import KvtierError
from kvtier.integrations.engine_dtype import DtypeChoice, host_dtype
from kvtier.integrations.engine_layout import has_gpu
from kvtier.redis_process import RedisServer, free_port
from kvtier.runtime.engine_process import (
    Completion,
    Server,
    kvtier_serve_command,
    plain_vllm_command,
    plain_vllm_env,
)

TIERS = ("memory", "disk", "redis", "s3")
CHUNK_TOKENS = 256  # kvtier serve's default chunk
NOT_DROPPED = "page cache NOT dropped (not root): each disk hit reads a prompt whose files were"
NOT_DROPPED += " written with O_DIRECT and never read"


class _Run:
    """One benchmark run: its servers, work directory, rows and progress bar."""

    def __init__(self, args: argparse.Namespace, work: Path, bar: tqdm[Any]):
        self.args, self.work, self.bar = args, work, bar
        self.rows: list[dict[str, Any]] = []
        self.cores: dict[str, list[int] | None] = {}  # path -> cores vLLM computed on
        self.model_in: dict[str, str] = {}  # path -> "engine core" or "worker process"
        # length -> the raw medium reading the same bytes as that length's hit
        self.raw: dict[int, dict[str, float | None]] = {n: {} for n in args.lengths}
        self.fill: dict[int, list[list[int]]] = {}  # the prompts the cold path stored
        self._logs = 0

    def server(
        self, command: Callable[[int], list[str]], env: dict[str, str] | None = None
    ) -> Server:
        self._logs += 1
        port = free_port()
        log = self.work / f"server{self._logs}.log"
        return Server(command(port), port, log, env=env, warm_up=True)

    def kvtier(self, *options: str) -> Server:
        """A kvtier server; its tiers raw unless ``options`` name a codec (without --codec,
        a server stores what the model passed the quality gate with on this machine)."""
        if "--codec" not in options:
            options = (*options, "--codec", "none")
        dtype = self.args.engine_dtype.serve_options()
        return self.server(
            lambda port: kvtier_serve_command(port, *SERVE_OPTIONS, *dtype, *options)
        )

    def vllm(self, *options: str) -> Server:
        def command(port: int) -> list[str]:
            return plain_vllm_command(port, *SERVE_OPTIONS, *options, dtype=self.args.engine_dtype)

        return self.server(command, plain_vllm_env(*SERVE_OPTIONS, *options))

    def send(self, server: Server, ids: list[int]) -> Completion:
        reply = server.complete(ids, max_tokens=1)
        self.bar.update()
        return reply

    def record(
        self, tokens: int, path: str, replies: list[Completion], error: str = "", warm: int = 0
    ) -> None:
        row: dict[str, Any] = {"tokens": tokens, "path": path, "ttft_s": None}
        if warm:  # the first requests, not counted
            row["warm_up_s"] = [round(r.seconds, 4) for r in replies[:warm]]
            replies = replies[warm:]
        if replies:
            recomputed = [r.recomputed_tokens for r in replies]
            known = [n for n in recomputed if n is not None]
            row["ttft_s"] = statistics.median(r.seconds for r in replies)
            # the worst of the requests; None if the server did not say
            row["recomputed_tokens"] = max(known) if len(known) == len(replies) else None
            row["times_s"] = [round(r.seconds, 4) for r in replies]
        if error:
            row["error"] = error[-500:]
        self.rows.append(row)

    def loaded_tokens(self, tokens: int, path: str) -> int | None:
        """Prompt tokens that path's requests did not compute (the hit), or None."""
        for row in self.rows:
            if row["tokens"] == tokens and row["path"] == path:
                recomputed = row.get("recomputed_tokens")
                return None if recomputed is None else tokens - recomputed
        return None

    def measure(
        self, server: Server, path: str, requests: dict[int, list[list[int]]], warm: int = 0
    ) -> None:
        """Send each length's prompts in order, the first ``warm`` not counted; a failure (a
        dead server) fails that length."""
        self.cores[path] = server.cores()
        self.model_in[path] = server.model_process()
        for n, prompts in requests.items():
            try:
                self.record(n, path, [self.send(server, ids) for ids in prompts], warm=warm)
            except (KvtierError, OSError) as exc:
                self.record(n, path, [], f"{exc} | {server.tail(300)}")


def run(args: argparse.Namespace) -> int:
    lengths = [int(t) for t in args.tokens.split(",") if t.strip()]
    tiers = [t for t in args.tiers.split(",") if t.strip()]
    unknown = set(tiers) - set(TIERS)
    if unknown or not lengths or any(not 256 < n < 8192 for n in lengths):
        raise SystemExit(f"kvtier bench ttft: --tiers from {TIERS}, --tokens in (256, 8192)")
    if min(args.batch, args.rounds, args.repeat, args.engines) < 1:
        raise SystemExit(
            "kvtier bench ttft: --batch, --rounds, --repeat and --engines must be at least 1"
        )
    args.lengths = lengths
    args.engine_dtype = host_dtype(args.dtype, has_gpu())
    print(f"kvtier bench ttft: {args.engine_dtype.summary()}", file=sys.stderr)
    r = args.repeat
    lower = (r + 1) * (("disk" in tiers) + ("redis" in tiers))  # per copy of those hits
    per_length = 3 * r + 1 + (r + 2) * ("memory" in tiers) + lower * (1 + bool(args.encrypt))
    per_length += (r + 1) * ("s3" in tiers)
    per_length += (0 if args.no_example else 1 + r) + lower * bool(args.codec)
    total = len(lengths) * per_length + (0 if args.no_overhead else 2 * args.engines)
    bar = tqdm(total=total, desc="bench ttft", unit="step", file=sys.stderr, disable=None)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-ttft-")))
        redis_url = args.redis
        if "redis" in tiers and not redis_url:
            redis_url = stack.enter_context(RedisServer()).url
        bench = _Run(args, work, bar)
        s3_url = stack.enter_context(object_store(args.s3_url)) if "s3" in tiers else None
        cache_dropped = _hit_paths(bench, lengths, tiers, redis_url, s3_url)
        if args.encrypt:
            sealed_paths(bench, tiers, redis_url)
        coded = codec_paths(bench, tiers, redis_url, args.codec) if args.codec else None
        if not args.no_example:
            example_paths(bench, lengths)
        overhead = {} if args.no_overhead else _overhead(args, work, bar)
        bar.close()
    order = ["cold_vllm", "cold", "vllm_prefix", "kvtier_memory", "kvtier_disk", "kvtier_redis"]
    order += ["kvtier_s3", "kvtier_disk_sealed", "kvtier_redis_sealed", "example_connector"]
    rows = sorted(bench.rows, key=lambda row: (row["tokens"], codec_order(row["path"], order)))
    result = {
        "rows": rows,
        **overhead,
        "cache_dropped": cache_dropped,
        "repeat": r,
        "cores": bench.cores,
        "model_in": bench.model_in,
        "raw": bench.raw,
        "engine_dtype": args.engine_dtype.as_dict(),
        "crypto_gb_s": crypto_speed() if args.encrypt else None,
        "codec": coded,
    }
    if args.json:
        print(json.dumps(result))
    else:
        _print(result, lengths)
    return 0


def _hit_paths(
    bench: _Run, lengths: list[int], tiers: list[str], redis_url: str | None, s3_url: str | None
) -> bool:
    """cold_vllm, cold, vllm_prefix and the kvtier tiers; whether the page cache was dropped."""
    r = bench.args.repeat
    # the prompts the kvtier servers read back, the first of each length their warm-up
    fill = bench.fill = {n: [prompt("shared", n, k) for k in range(r + 1)] for n in lengths}
    with bench.vllm() as plain:
        cold = {n: [prompt("plain", n, k) for k in range(r)] for n in lengths}
        bench.measure(plain, "cold_vllm", cold)
        bench.measure(plain, "vllm_prefix", {n: cold[n][:1] * r for n in lengths})
    shared = ["--disk", str(bench.work / "disk")] if "disk" in tiers else ["--disk", "none"]
    shared += ["--redis", redis_url] if "redis" in tiers and redis_url else []
    shared += ["--s3", s3_url] if s3_url else []
    with bench.kvtier(*shared) as first:  # fills disk and Redis with `fill`
        bench.measure(first, "cold", fill, warm=1)
    if "memory" in tiers:
        with bench.kvtier("--disk", "none", *NO_PREFIX_CACHE) as memory:
            for n in lengths:
                again = prompt("memory", n, 0)
                try:
                    bench.send(memory, again)  # computed, and saved to the DRAM tier
                except (KvtierError, OSError) as exc:
                    bench.record(n, "kvtier_memory", [], str(exc))
                    continue
                bench.measure(memory, "kvtier_memory", {n: [again] * (r + 1)}, warm=1)
    dropped = False
    if "disk" in tiers:
        dropped = drop_page_cache()
        with bench.kvtier("--disk", str(bench.work / "disk"), *NO_PREFIX_CACHE) as disk:
            bench.measure(disk, "kvtier_disk", fill, warm=1)
        files = [(p, p.stat().st_size) for p in (bench.work / "disk").rglob("*.kvc")]
        for n in lengths:
            picked = same_bytes(files, bench.loaded_tokens(n, "kvtier_disk"))
            bench.raw[n]["disk_cold_read_s"] = raw_io.cold_read_s(picked) if picked else None
            bench.raw[n]["disk_cold_read_bytes"] = sum(p.stat().st_size for p in picked)
    if "redis" in tiers and redis_url:
        with bench.kvtier("--disk", "none", "--redis", redis_url, *NO_PREFIX_CACHE) as redis:
            bench.measure(redis, "kvtier_redis", fill, warm=1)
        values = raw_io.redis_values(redis_url, "kvtier")
        for n in lengths:
            keys = same_bytes(values, bench.loaded_tokens(n, "kvtier_redis"))
            bench.raw[n]["redis_get_s"] = raw_io.pipelined_get_s(redis_url, keys) if keys else None
            sizes = dict(values)
            bench.raw[n]["redis_get_bytes"] = sum(sizes[k] for k in keys)
    if s3_url:
        s3_path(bench, s3_url)
    return dropped


def _overhead(args: argparse.Namespace, work: Path, bar: tqdm[Any]) -> dict[str, Any]:
    """The no-reuse overhead, paired in one engine process (see the module docstring)."""
    batch = {
        "batch": args.batch,
        "rounds": args.rounds,
        "tokens": 1024,
        "stats": True,
        "dtype": args.engine_dtype.dtype,
    }
    rounds: dict[str, list[float]] = {"off": [], "on": [], "bypassed": []}
    pairs: list[float] = []  # on / bypassed, each pair in one engine, back to back
    errors: list[str] = []
    for k in range(2 * args.engines):  # off, on, off, on...: drift hits both sides
        side = ("off", "on")[k % 2]
        spec: dict[str, Any] = {"connector": "none"}
        if side == "on":  # the serve default: DRAM, then a local disk (fresh each time)
            memory = {"kind": "memory", "capacity": "4GiB"}
            disk = {"kind": "disk", "path": str(work / f"overhead{k}"), "fsync": False}
            store: dict[str, Any] = {"tiers": [memory, disk]}
            if args.encrypt:  # the disk tier sealed, as kvtier serve --master-key-file does
                store.update(sealed_store_spec(work))
            store = coded_store_spec(store, args.codec)
            spec = {"connector": "kvtier", "store": store, "paired": True}
        times, err = _job_times({**spec, **batch})
        bar.update()
        if times:
            rounds[side] += times["seconds"]
            rounds["bypassed"] += times["bypassed"]
            pairs += [a / b for a, b in zip(times["seconds"], times["bypassed"], strict=False)]
        errors += [f"{side}: {err}"] if err else []
    off, on = (statistics.median(rounds[s]) if rounds[s] else None for s in ("off", "on"))
    return {
        "no_reuse_overhead": statistics.median(pairs) - 1 if pairs else None,
        "no_reuse_overhead_across_engines": (on - off) / off if on and off else None,
        "no_reuse_seconds": {"off": off, "on": on, "rounds": rounds, "pairs": pairs},
        "errors": errors,
    }


def _job_times(job: dict[str, Any]) -> tuple[dict[str, list[float]] | None, str | None]:
    """An overhead engine's timings (``seconds``, and ``bypassed`` when paired), or an error."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvtier.bench.ttft_worker", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            times: dict[str, list[float]] = json.loads(line[len(MARK) :])
            return times, None
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
    return None, f"exit status {proc.returncode}: " + " | ".join(tail)[-500:]


def _print(result: dict[str, Any], lengths: list[int]) -> None:
    rows = result["rows"]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    print(
        "kvtier bench ttft: time to first token over HTTP, median of"
        f" {result['repeat']} requests, in seconds (x = speed-up over cold;"
        " r = prompt tokens the engine recomputed; each kvtier server's first request of each"
        " length not counted)"
    )
    print(f"  measured on: {DtypeChoice.from_dict(result['engine_dtype']).summary()}")
    print(f"  {'path':<18}" + "".join(f"{n:>22}" for n in lengths))
    cold = {r["tokens"]: r["ttft_s"] for r in rows if r["path"] == "cold"}
    for path in paths:
        cells = []
        for n in lengths:
            row = next((r for r in rows if r["path"] == path and r["tokens"] == n), None)
            if row is None or row["ttft_s"] is None:
                cells.append(f"{'failed' if row else '-':>22}")
                continue
            speedup = cold[n] / row["ttft_s"] if cold.get(n) else 0.0
            recomputed = row.get("recomputed_tokens")
            r_text = "?" if recomputed is None else str(recomputed)
            cells.append(f"{row['ttft_s']:>8.3f} {speedup:>5.1f}x r={r_text:<5}")
        print(f"  {path:<18}" + "".join(cells))
    if "kvtier_disk" in paths:
        disk = "page cache dropped before the disk reads" if result["cache_dropped"] else ""
        print(f"  kvtier_disk: {disk or NOT_DROPPED}")
    cores = {str(c) for c in result["cores"].values()}
    places = set(result["model_in"].values())
    place = f"the model in its {places.pop()}" if len(places) == 1 else str(result["model_in"])
    where = cores.pop() if len(cores) == 1 else f"{result['cores']} (NOT the same)"
    print(f"  every server's engine computed on cores {where}, {place}")
    _print_targets(result, lengths)
    print_sealed(result, lengths)
    print_codec(result, lengths)
    print_s3(result, lengths)
    for row in rows:
        if row.get("error"):
            print(f"  {row['path']} at {row['tokens']} tokens failed: {row['error']}")
    if result.get("no_reuse_overhead") is not None:
        print(
            f"  no-reuse throughput overhead of kvtier: {100 * result['no_reuse_overhead']:+.1f}%"
            " (median of rounds paired in one engine, connector working vs bypassed)"
        )
    across = result.get("no_reuse_overhead_across_engines")
    if across is not None:
        print(
            f"  across engine processes: {100 * across:+.1f}% (median round"
            f" {result['no_reuse_seconds']['on']:.2f}s with kvtier vs"
            f" {result['no_reuse_seconds']['off']:.2f}s in engines without a connector)"
        )


def _print_targets(result: dict[str, Any], lengths: list[int]) -> None:
    """Each hit against vLLM's own prefix hit, and slow tiers against their raw medium."""
    ttft = {(r["tokens"], r["path"]): r["ttft_s"] for r in result["rows"]}
    for n in lengths:
        prefix, memory = ttft.get((n, "vllm_prefix")), ttft.get((n, "kvtier_memory"))
        parts = []
        for path in ("kvtier_memory", "kvtier_redis", "kvtier_disk"):
            if prefix and ttft.get((n, path)):
                parts.append(f"{path[7:]} {ttft[(n, path)] / prefix:.2f}x")
        raw = result["raw"].get(n) or result["raw"].get(str(n)) or {}
        for path, key in (("kvtier_disk", "disk_cold_read_s"), ("kvtier_redis", "redis_get_s")):
            hit, base = ttft.get((n, path)), raw.get(key)
            if hit and memory and base:
                parts.append(
                    f"{path[7:]} - memory = {hit - memory:.3f}s = {(hit - memory) / base:.1f}x"
                    f" the raw {'cold read' if 'disk' in key else 'pipelined GETs'}"
                    f" ({base:.3f}s)"
                )
        if parts:
            print(f"  {n} tokens, against vllm_prefix: " + "; ".join(parts))
