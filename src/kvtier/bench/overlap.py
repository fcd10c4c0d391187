"""``kvtier bench overlap``: what a long load from disk or Redis costs the streams already
decoding, and the request that loads, through ``kvtier serve``.

A first server computes long prompts (``--tokens``, 8,000 by default) and writes their chunks
to disk and Redis. Then, for each tier and each load mode (``--modes``: ``sync`` loads before
the forward pass, as kvtier did before; ``auto`` loads from disk and Redis in the background
while the request waits in WAITING_FOR_REMOTE_KVS), a restarted server (that tier alone,
vLLM's prefix cache off; page cache dropped first when this process may) runs a stream of
greedy tokens; once it has produced ``--warm-tokens`` tokens, one long prompt is sent with
``max_tokens=1``. Every repeat sends a distinct long prompt, so every load reads the medium.

Per tier and mode: the long prompt's TTFT (median), the load time the server logged, and the
stream's inter-token latency (ITL): p50/p99 before the long prompt arrived, p99 and the longest
gap while it was served. One layer's load is the sync load time over the model's layers: the
target is that the ITL p99 while a background load runs grows by no more than that, and that
the loading request's TTFT is no worse than with a sync load.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kvtier.bench.common import NO_PREFIX_CACHE, SERVE_OPTIONS, drop_page_cache, prompt
from kvtier.config import LOAD_MODES
from kvtier.errors import KvtierError
from kvtier.integrations.engine_dtype import DtypeChoice, host_dtype
from kvtier.integrations.engine_layout import has_gpu
from kvtier.redis_process import RedisServer, free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command

TIERS = ("disk", "redis")
_LOADED = re.compile(
    r"request (\S+): loaded (\d+) tokens \(([^)]*)\) (in the background )?in (\d+) ms"
)


def run(args: argparse.Namespace) -> int:
    tiers = [t for t in args.tiers.split(",") if t.strip()]
    modes = [m for m in args.modes.split(",") if m.strip()]
    reference = "prefix" in modes
    modes = [m for m in modes if m != "prefix"]
    if set(tiers) - set(TIERS) or set(modes) - set(LOAD_MODES) or not tiers or not modes:
        raise SystemExit(
            f"kvtier bench overlap: --tiers from {TIERS}, --modes from prefix and {LOAD_MODES}"
        )
    if not 256 < args.tokens < 8192 or args.repeat < 1 or args.warm_tokens < 2:
        raise SystemExit(
            "kvtier bench overlap: --tokens in (256, 8192), --repeat >= 1, --warm-tokens >= 2"
        )
    dtype = host_dtype(args.dtype, has_gpu())
    print(f"kvtier bench overlap: {dtype.summary()}", file=sys.stderr)
    total = len(modes) * args.repeat * (1 + len(tiers)) + 2 * args.repeat * reference
    bar = tqdm(total=total, desc="bench overlap", unit="request", file=sys.stderr, disable=None)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-overlap-")))
        redis_url = args.redis
        if "redis" in tiers and not redis_url:
            redis_url = stack.enter_context(RedisServer()).url
        longs = {
            m: [prompt(f"overlap-{m}", args.tokens, k) for k in range(args.repeat)] for m in modes
        }
        writer = ["--disk", str(work / "disk")] + (["--redis", redis_url] if redis_url else [])
        with _server(work, "writer", dtype, *writer) as first:
            for ids in (ids for m in modes for ids in longs[m]):
                first.complete(ids, max_tokens=1)
                bar.update()
        if reference:
            rows.append(_prefix_row(work, args, dtype, bar))
        dropped = False
        for tier in tiers:
            options = ["--disk", str(work / "disk")] if tier == "disk" else ["--disk", "none"]
            options += ["--redis", redis_url] if tier == "redis" and redis_url else []
            for mode in modes:
                if tier == "disk":
                    dropped = drop_page_cache()
                label = f"{tier}-{mode}"
                loads = [*options, *NO_PREFIX_CACHE, "--loads", mode]
                with _server(work, label, dtype, *loads) as server:
                    trials = []
                    for k, ids in enumerate(longs[mode]):
                        trials.append(_trial(server, ids, prompt(label, 64, k), args.warm_tokens))
                        bar.update()
                    rows.append(_row(tier, mode, trials, server))
        bar.close()
    result = {
        "rows": rows,
        "tokens": args.tokens,
        "layers": _layers(),
        "cache_dropped": dropped,
        "repeat": args.repeat,
        "engine_dtype": dtype.as_dict(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


def _prefix_row(
    work: Path, args: argparse.Namespace, dtype: DtypeChoice, bar: tqdm[Any]
) -> dict[str, Any]:
    """The reference: the same trial where the long prompt hits vLLM's own prefix cache, so
    that nothing is loaded; the stream still waits for the step that computes the prompt's
    last tokens over its whole context, as it would after any hit."""
    with _server(work, "prefix", dtype, "--disk", "none") as server:
        trials = []
        for k in range(args.repeat):
            long = prompt("overlap-prefix", args.tokens, k)
            server.complete(long, max_tokens=1)  # computed now, held by vLLM's prefix cache
            bar.update()
            trials.append(_trial(server, long, prompt("prefix", 64, k), args.warm_tokens))
            bar.update()
        return _row("-", "prefix", trials, server)


def _server(work: Path, label: str, dtype: DtypeChoice, *options: str) -> Server:
    port = free_port()
    return Server(
        kvtier_serve_command(port, *SERVE_OPTIONS, *dtype.serve_options(), *options),
        port,
        work / f"{label}.log",
        warm_up=True,
    )


def _trial(server: Server, long: list[int], short: list[int], warm: int) -> dict[str, Any]:
    """A stream runs; after ``warm`` of its tokens, ``long`` is sent. Times and the gaps."""
    arrivals: list[float] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            server.stream(short, 2000, arrivals=arrivals, stop=stop)
        except (KvtierError, OSError) as exc:
            failure.append(exc)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    while len(arrivals) < warm and thread.is_alive():
        time.sleep(0.005)
    sent = time.perf_counter()
    reply = server.complete(long, max_tokens=1)
    done = time.perf_counter()
    settle = done + 0.5  # and a little after, for gaps that end after the reply
    while time.perf_counter() < settle and thread.is_alive():
        time.sleep(0.01)
    stop.set()
    thread.join(60)
    if failure or len(arrivals) < warm:
        raise KvtierError(f"the stream failed: {failure or 'it ended early'}")
    gaps = np.diff(np.array(arrivals))
    starts, ends = np.array(arrivals[:-1]), np.array(arrivals[1:])
    before = gaps[ends <= sent]
    during = gaps[(ends > sent) & (starts < done)]
    return {
        "ttft_s": reply.seconds,
        "recomputed_tokens": reply.recomputed_tokens,
        "before_ms": (1000 * before).tolist(),
        "during_ms": (1000 * during).tolist(),
    }


def _row(tier: str, mode: str, trials: list[dict[str, Any]], server: Server) -> dict[str, Any]:
    before = [g for t in trials for g in t["before_ms"]]
    during = [g for t in trials for g in t["during_ms"]]
    loads = [(int(m[5]), bool(m[4])) for m in _LOADED.finditer(server.tail(1 << 22))]
    loads = loads[-len(trials) :]  # the warm-up loads nothing
    return {
        "tier": tier,
        "mode": mode,
        "ttft_s": statistics.median(t["ttft_s"] for t in trials),
        "ttft_times_s": [round(t["ttft_s"], 4) for t in trials],
        "recomputed_tokens": max((t["recomputed_tokens"] or 0) for t in trials),
        "load_ms": statistics.median(ms for ms, _ in loads) if loads else None,
        "background": bool(loads) and all(bg for _, bg in loads),
        "itl_before_p50_ms": float(np.percentile(before, 50)) if before else None,
        "itl_before_p99_ms": float(np.percentile(before, 99)) if before else None,
        "itl_during_p90_ms": float(np.percentile(during, 90)) if during else None,
        "itl_during_p99_ms": float(np.percentile(during, 99)) if during else None,
        "itl_during_max_ms": max(during) if during else None,
        "gaps_during": len(during),
    }


def _layers() -> int | None:
    from kvtier.integrations.model import prepare_default_model

    try:
        config = json.loads((prepare_default_model() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return int(config.get("num_hidden_layers", 0)) or None


def _print(result: dict[str, Any]) -> None:
    print(
        f"kvtier bench overlap: a stream decoding while a {result['tokens']}-token prompt loads"
        f" (median of {result['repeat']}; ITL in ms, before the prompt / while it is served)"
    )
    print(f"  measured on: {DtypeChoice.from_dict(result['engine_dtype']).summary()}")
    print(
        f"  {'tier':<6}{'mode':<6}{'TTFT s':>8}{'load ms':>9}{'ITL p50':>9}{'p99':>7}"
        f"{'p90 during':>12}{'p99 during':>12}{'max during':>12}{'gaps':>6}"
    )

    def cell(row: dict[str, Any], key: str, width: int) -> str:
        value = row.get(key)
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.0f}"

    for row in result["rows"]:
        print(
            f"  {row['tier']:<6}{row['mode']:<6}{row['ttft_s']:>8.3f}{cell(row, 'load_ms', 9)}"
            f"{cell(row, 'itl_before_p50_ms', 9)}{cell(row, 'itl_before_p99_ms', 7)}"
            f"{cell(row, 'itl_during_p90_ms', 12)}{cell(row, 'itl_during_p99_ms', 12)}"
            f"{cell(row, 'itl_during_max_ms', 12)}"
            f"{row['gaps_during']:>6}"
            + ("  (loaded in the background)" if row["background"] else "")
        )
    drop = "dropped" if result["cache_dropped"] else "NOT dropped (not root): distinct prompts"
    print(f"  disk: page cache {drop} before each server; every load reads a distinct prompt")
    layers = result["layers"]
    by = {(r["tier"], r["mode"]): r for r in result["rows"]}
    prefix = by.get(("-", "prefix"))
    print(
        "  prefix: the same hit from vLLM's own prefix cache, nothing loaded (every hit ends"
        " with a step computing the prompt's last tokens over its whole context)"
    )
    for tier in dict.fromkeys(r["tier"] for r in result["rows"]):
        sync, auto = by.get((tier, "sync")), by.get((tier, "auto"))
        if not (sync and auto and prefix and layers and sync["load_ms"]):
            continue
        if auto["itl_during_p99_ms"] is None or prefix["itl_during_p99_ms"] is None:
            continue
        layer = sync["load_ms"] / layers
        grew = auto["itl_during_p99_ms"] - prefix["itl_during_p99_ms"]
        stalled = (sync["itl_during_p99_ms"] or 0) - prefix["itl_during_p99_ms"]
        print(
            f"  {tier}: ITL p99 while loading, over the prefix hit's: +{grew:.0f} ms in the"
            f" background vs +{stalled:.0f} ms sync (target <= one layer's load: {layer:.0f} ms"
            f" = {sync['load_ms']:.0f} ms / {layers} layers); TTFT {auto['ttft_s']:.3f}s vs"
            f" {sync['ttft_s']:.3f}s sync ({auto['ttft_s'] / sync['ttft_s']:.2f}x)"
        )
