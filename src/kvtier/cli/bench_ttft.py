"""``kvtier bench ttft``: time to first token with and without kvtier, side by side.

For each prompt length, in one run (every engine is a separate process, vLLM on this machine):

- cold:              nothing cached anywhere;
- vllm_prefix:       the same prompt again in the same engine, from vLLM's own prefix cache
                     (the upper bound for any cache hit);
- kvtier_memory:     the same prompt again in an engine with vLLM's prefix cache off, so the
                     hit comes from kvtier's DRAM tier;
- kvtier_disk/redis: a fresh engine process whose only cache is that kvtier tier, filled by
                     an earlier process;
- example_connector: the same with vLLM's ExampleConnector (its files written by an earlier
                     process); a crash is recorded as an error for that length.

Every hit is timed ``--repeat`` times in its engine and the median reported (a cold prefill
once: it takes seconds). Plus the throughput cost of kvtier when nothing is reused: rounds of
distinct prompts with the connector on (saving every chunk to DRAM and disk) vs off. Identical
engine processes differ by several percent on this machine, rounds within one engine by about
one, so the overhead is measured in pairs of rounds in the same engine, connector working and
bypassed, in alternating order (``no_reuse_overhead``: the median pair). ``--engines`` such
engines alternate with as many engines without any connector, and the comparison of their
median rounds is reported too (``no_reuse_overhead_across_engines``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvtier.integrations.ttft_worker import MARK
from kvtier.redis_process import RedisServer

TIERS = ("memory", "disk", "redis")


def register(bsub: Any) -> None:
    p = bsub.add_parser(
        "ttft",
        help="time to first token: cold, vLLM prefix cache, kvtier tiers, ExampleConnector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tokens",
        default="1024,3968,7936",
        help="prompt lengths, comma-separated (SmolLM2 allows up to 8191)",
    )
    p.add_argument("--tiers", default=",".join(TIERS), help="kvtier tiers to measure")
    p.add_argument("--redis", metavar="URL", help="Redis to use (default: a private server)")
    p.add_argument("--no-example", action="store_true", help="skip vLLM's ExampleConnector")
    p.add_argument("--batch", type=int, default=6, help="distinct prompts per overhead round")
    p.add_argument("--rounds", type=int, default=3, help="timed overhead rounds per engine")
    p.add_argument("--engines", type=int, default=3, help="overhead engines per side")
    p.add_argument("--repeat", type=int, default=3, help="timed hits per path (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _job(job: dict[str, Any]) -> tuple[list[float] | None, str | None]:
    got, err = _job_times(job)
    return (got["seconds"] if got else None), err


def _job_times(job: dict[str, Any]) -> tuple[dict[str, list[float]] | None, str | None]:
    """The worker's timings (``seconds``, and ``bypassed`` for paired jobs), or an error."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvtier.integrations.ttft_worker", json.dumps(job)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            times: dict[str, list[float]] = json.loads(line[len(MARK) :])
            return times, None
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
    return None, f"exit status {proc.returncode}: " + " | ".join(tail)[-500:]


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
    rows: list[dict[str, Any]] = []
    hits = args.repeat
    steps = (
        len(lengths) * (2 + ("disk" in tiers) + ("redis" in tiers) + 2 * (not args.no_example))
        + 2 * args.engines
    )
    bar = tqdm(total=steps, desc="bench ttft", unit="engine", file=sys.stderr, disable=None)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-ttft-")))
        redis_url = args.redis
        if "redis" in tiers and not redis_url:
            redis_url = stack.enter_context(RedisServer()).url

        def record(tokens: int, path: str, times: list[float] | None, error: str | None) -> None:
            seconds = statistics.median(times) if times else None
            row: dict[str, Any] = {"tokens": tokens, "path": path, "ttft_s": seconds}
            if error:
                row["error"] = error
            rows.append(row)

        def job(spec: dict[str, Any]) -> tuple[list[float] | None, str | None]:
            result = _job(spec)
            bar.update()
            return result

        for n in lengths:
            again = [[n, n]] * (1 + hits)
            got, err = job({"connector": "none", "prefix_cache": True, "requests": again})
            record(n, "cold", got[:1] if got else None, err)
            record(n, "vllm_prefix", got[1:] if got else None, err)
            if "memory" in tiers:  # DRAM is per process: the hits follow the first request
                only = {"tiers": [{"kind": "memory", "capacity": "4GiB"}]}
                got, err = job({"connector": "kvtier", "store": only, "requests": again})
                record(n, "kvtier_memory", got[1:] if got else None, err)
            shared: list[dict[str, Any]] = []
            if "disk" in tiers:
                shared.append(
                    {
                        "kind": "disk",
                        "path": str(work / f"disk{n}"),
                        "capacity": "20GiB",
                        "fsync": False,
                    }
                )
            if "redis" in tiers:
                shared.append({"kind": "redis", "url": redis_url, "prefix": f"ttft{n}"})
            if shared:  # one process fills the shared tiers, then a fresh one per tier reads
                _, err = job(
                    {"connector": "kvtier", "store": {"tiers": shared}, "requests": [[n, n]]}
                )
            for tier in shared:
                got, err2 = (
                    (None, err)
                    if err
                    else job(
                        {"connector": "kvtier", "store": {"tiers": [tier]}, "requests": again[1:]}
                    )
                )
                record(n, f"kvtier_{tier['kind']}", got, err2)
            if not args.no_example:
                path = str(work / f"example{n}")
                _, err = job({"connector": "example", "path": path, "requests": [[n, n]]})
                got, err2 = (
                    (None, err)
                    if err
                    else job({"connector": "example", "path": path, "requests": again[1:]})
                )
                record(n, "example_connector", got, err2)
        batch = {"batch": args.batch, "rounds": args.rounds, "tokens": 1024}
        rounds: dict[str, list[float]] = {"off": [], "on": [], "bypassed": []}
        pairs: list[float] = []  # on / bypassed, each pair in one engine, back to back
        errors: list[str] = []
        for k in range(2 * args.engines):  # off, on, off, on...: drift hits both sides
            side = ("off", "on")[k % 2]
            spec: dict[str, Any] = {"connector": "none"}
            if side == "on":  # the serve default: DRAM, then a local disk (fresh each time)
                memory = {"kind": "memory", "capacity": "4GiB"}
                disk = {"kind": "disk", "path": str(work / f"overhead{k}"), "fsync": False}
                store = {"tiers": [memory, disk]}
                spec = {"connector": "kvtier", "store": store, "paired": True}
            times, err = _job_times({**spec, **batch})
            bar.update()
            if times:
                rounds[side] += times["seconds"]
                rounds["bypassed"] += times["bypassed"]
                pairs += [a / b for a, b in zip(times["seconds"], times["bypassed"], strict=False)]
            errors += [f"{side}: {err}"] if err else []
        bar.close()
        off, on = (statistics.median(rounds[s]) if rounds[s] else None for s in ("off", "on"))
        result = {
            "rows": rows,
            "no_reuse_overhead": statistics.median(pairs) - 1 if pairs else None,
            "no_reuse_overhead_across_engines": (on - off) / off if on and off else None,
            "no_reuse_seconds": {"off": off, "on": on, "rounds": rounds, "pairs": pairs},
            "errors": errors,
        }
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result, lengths)
    return 0


def _print(result: dict[str, Any], lengths: list[int]) -> None:
    rows = result["rows"]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    print("kvtier bench ttft: time to first token in seconds (x = speed-up over cold)")
    print(f"  {'path':<18}" + "".join(f"{n:>16}" for n in lengths))
    cold = {r["tokens"]: r["ttft_s"] for r in rows if r["path"] == "cold"}
    for path in paths:
        cells = []
        for n in lengths:
            row = next((r for r in rows if r["path"] == path and r["tokens"] == n), None)
            if row is None or row["ttft_s"] is None:
                cells.append(f"{'failed' if row else '-':>16}")
            else:
                speedup = cold.get(n) / row["ttft_s"] if cold.get(n) else 0
                cells.append(f"{row['ttft_s']:>9.3f} {speedup:>5.1f}x")
        print(f"  {path:<18}" + "".join(cells))
    for row in rows:
        if row.get("error"):
            print(f"  {row['path']} at {row['tokens']} tokens failed: {row['error']}")
    if result["no_reuse_overhead"] is not None:
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
