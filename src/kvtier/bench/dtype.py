"""``kvtier bench dtype``: what the engine dtype kvtier picks costs on this host, against each
dtype forced by hand.

Servers are started as users start them: ``kvtier serve`` with the dtype it measures (the
default), then ``kvtier serve --dtype D`` for each of ``--dtypes``, one after another, each on
the same cores. Each gets ``--repeat`` cold prompts of random token ids (``--tokens``, not a
multiple of vLLM's blocks or kvtier's chunks; distinct for every request, so nothing is reused;
vLLM's prefix cache off) with ``max_tokens=1``: the response time is the cold TTFT. Reported:
the median per server and its ratio to the fastest forced dtype. A forced dtype the CPU does not
compute natively can take minutes per request (bf16 on a CPU with AVX2 alone: use
``--slow-tokens`` for a shorter prompt there, reported as tokens per second).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvtier.bench.common import NO_PREFIX_CACHE, SERVE_OPTIONS, prompt
from kvtier.errors import KvtierError
from kvtier.integrations.engine_dtype import DtypeChoice, choose_dtype
from kvtier.integrations.engine_layout import has_gpu
from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command


def run(args: argparse.Namespace) -> int:
    forced = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    slow_tokens = args.slow_tokens or args.tokens
    if not 256 < args.tokens < 8192 or not 16 <= slow_tokens < 8192 or args.repeat < 1:
        raise KvtierError("--tokens in (256, 8192), --slow-tokens in [16, 8192), --repeat >= 1")
    picked = choose_dtype(has_gpu())
    print(f"kvtier bench dtype: {picked.line()}", file=sys.stderr)
    runs = [("picked", picked.dtype, picked.serve_options(), args.tokens)]
    for dtype in forced:
        tokens = args.tokens if dtype == picked.dtype else slow_tokens
        runs.append((f"--dtype {dtype}", dtype, ["--dtype", dtype], tokens))
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(runs) * args.repeat,
        desc="bench dtype",
        unit="request",
        file=sys.stderr,
        disable=None,
    )
    with tempfile.TemporaryDirectory(prefix="kvtier-dtype-") as tmp:
        for label, dtype, options, tokens in runs:
            rows.append(_measure(Path(tmp), label, dtype, options, tokens, args.repeat, bar))
    bar.close()
    result = {"picked": picked.as_dict(), "rows": rows, "repeat": args.repeat}
    hand = [r for r in rows[1:] if r["dtype"] == picked.dtype and r["ttft_s"]]
    if rows[0]["ttft_s"] and hand:
        result["picked_over_by_hand"] = rows[0]["ttft_s"] / hand[0]["ttft_s"]
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


def _measure(
    work: Path, label: str, dtype: str, options: list[str], tokens: int, repeat: int, bar: tqdm[Any]
) -> dict[str, Any]:
    port = free_port()
    command = kvtier_serve_command(
        port, *SERVE_OPTIONS, "--disk", "none", *NO_PREFIX_CACHE, *options
    )
    row: dict[str, Any] = {"server": label, "dtype": dtype, "tokens": tokens, "ttft_s": None}
    try:
        with Server(command, port, work / f"{dtype}.log", warm_up=True) as server:
            times = []
            for k in range(repeat):
                reply = server.complete(prompt(f"dtype-{label}", tokens, k), timeout_s=1800)
                if reply.recomputed_tokens not in (None, reply.prompt_tokens):
                    raise KvtierError(f"a cold prompt was served from a cache: {reply}")
                times.append(reply.seconds)
                bar.update()
    except (KvtierError, OSError) as exc:
        row["error"] = str(exc)[-500:]
        return row
    row["ttft_s"] = statistics.median(times)
    row["times_s"] = [round(t, 3) for t in times]
    row["tokens_per_s"] = tokens / row["ttft_s"]
    return row


def _print(result: dict[str, Any]) -> None:
    picked = DtypeChoice.from_dict(result["picked"])
    print(
        f"kvtier bench dtype: cold TTFT through kvtier serve over HTTP, median of"
        f" {result['repeat']} distinct prompts, prefix cache off"
    )
    print(f"  measured on: {picked.summary()}")
    print(f"  picked: {picked.reason}")
    print(f"  {'server':<20}{'dtype':<10}{'tokens':>7}{'TTFT s':>10}{'tokens/s':>10}")
    for row in result["rows"]:
        if row["ttft_s"] is None:
            print(
                f"  {row['server']:<20}{row['dtype']:<10}{row['tokens']:>7}  failed:"
                f" {row.get('error', '')}"
            )
            continue
        print(
            f"  {row['server']:<20}{row['dtype']:<10}{row['tokens']:>7}"
            f"{row['ttft_s']:>10.2f}{row['tokens_per_s']:>10.0f}"
        )
    ratio = result.get("picked_over_by_hand")
    if ratio is not None:
        print(f"  picked / the same dtype forced by hand: {ratio:.2f}x (target <= 1.2x)")
    rates = {r["dtype"]: r["tokens_per_s"] for r in result["rows"][1:] if r["ttft_s"]}
    if len(rates) > 1:
        best = max(rates, key=lambda d: rates[d])
        slow = ", ".join(
            f"{d} {rates[best] / rate:.1f}x slower" for d, rate in rates.items() if d != best
        )
        lengths = {r["tokens"] for r in result["rows"][1:] if r["ttft_s"]}
        note = " (prompts of different lengths: a longer one runs fewer tokens/s)"
        print(
            f"  forced by hand: {best} fastest in prompt tokens/s; {slow}"
            f"{note if len(lengths) > 1 else ''}"
        )
