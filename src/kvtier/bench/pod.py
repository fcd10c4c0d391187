"""``kvtier bench pod``: routing and disaggregated prefill/decode, measured through ``kvtier pod``.

Every figure comes from pods started as users start them (``kvtier pod``, each engine a
``kvtier serve`` in its own processes on its own core, the router in another) and from users
who stream over HTTP through the router. Engines get a small vLLM KV cache
(``--num-gpu-blocks-override``) so that the users' contexts together exceed one engine's: reuse
across turns must come from kvtier's tiers.

Routing (``--users`` users, ``--turns`` turns each, a ``--context``-token document in the first
turn): three runs of the same conversations, each in its own namespace (a ``cache_salt`` per
run, so no run reuses another's chunks):
  round-robin      a pod whose engines share no tier (``kvtier pod --redis none``)
  round-robin+shared  the engines of a pod with its redis-server, behind `kvtier router
                   --policy round-robin`
  kvtier           the same engines behind the pod's own router
Each engine's own tiers hold a part of what the users need, as a node's hold a part of a
fleet's: a DRAM tier of 60% of all users' contexts (``--dram``), no disk tier, so the pod's
DRAM holds every context 1.2 times over and no engine holds them all. A pod that routes by
where contexts are needs each engine to hold only its own users'; round-robin needs every
engine to hold everyone's.
Then, on that pod: the router's overhead (the ``x-kvtier-router-ms`` of each answer) for a chat
of ``--overhead-tokens`` tokens while two streams keep the engines busy.

Prefill/decode: ``--streams`` users decode without pause while ``--long`` cold prompts of
``--long-tokens`` tokens arrive every ``--every`` seconds; on 2 colocated engines (kvtier
routing) and on ``kvtier pod --prefill 1 --decode 1``: the streams' inter-token latency and the
long prompts' time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from kvtier.bench import workload
from kvtier.config import parse_size
from kvtier.errors import KvtierError
from kvtier.integrations.engine_dtype import DtypeChoice, host_dtype
from kvtier.integrations.engine_layout import has_gpu
from kvtier.redis_process import free_port

MODEL = "SmolLM2-135M-Instruct"
ENGINE_OPTIONS = (
    "--num-gpu-blocks-override",
    "80",
    "--max-model-len",
    "8192",
    "--enable-prompt-tokens-details",
    "--disk",
    "none",
)
KV_VALUES_PER_TOKEN = 11_520  # the embedded model's: 30 layers x K,V x 3 heads x 64 dims
TURN_TOKENS = 40  # a question and the chat template around a turn, about
DRAM_SHARE = 0.6  # of all users' contexts, each engine's DRAM tier holds this much (default)


def contexts_bytes(args: argparse.Namespace, dtype: DtypeChoice) -> int:
    """KV bytes of every user's whole conversation, in the engines' KV dtype."""
    per_user = args.context + args.turns * (args.answer + TURN_TOKENS)
    return int(args.users * per_user * KV_VALUES_PER_TOKEN * dtype.kv_itemsize)


class PodProcess:
    """``kvtier pod ARGS`` in its own session; stopped with SIGINT (as Ctrl-C)."""

    def __init__(self, args: list[str], state: Path, log: Path, dram: int):
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "kvtier.cli.main",
            "pod",
            "--port",
            str(self.port),
            "--state",
            str(state),
            "--dram",
            str(dram),
            *args,
            *ENGINE_OPTIONS,
        ]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout_s: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KvtierError(
                    f"kvtier pod exited; its log ({self.log}) ends with:\n"
                    + self.log.read_text()[-3000:]
                )
            with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                state = get_json(f"{self.url}/router/state")
                if state["engines"] and all(e["healthy"] and e["synced"] for e in state["engines"]):
                    return dict(state)
            time.sleep(1.0)
        raise KvtierError(f"kvtier pod did not start in {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextlib.contextmanager
def pod(
    args: list[str], work: Path, name: str, dram: int
) -> Iterator[tuple[PodProcess, dict[str, Any]]]:
    running = PodProcess(args, work / name, work / f"{name}.log", dram)
    try:
        state = running.wait()
        for engine in state["engines"]:  # the first request of an engine is slow: not measured
            post(
                engine["url"] + "/v1/completions",
                {"model": MODEL, "prompt": "Warm up.", "max_tokens": 2},
            )
        yield running, state
    finally:
        running.stop()


@contextlib.contextmanager
def round_robin_router(workers: list[str], log: Path) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "kvtier.cli.main",
        "router",
        "--policy",
        "round-robin",
        "--port",
        str(port),
        *(a for w in workers for a in ("--worker", w)),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError, http.client.HTTPException):
                if all(e["healthy"] for e in get_json(f"{url}/router/state")["engines"]):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise KvtierError(f"kvtier router did not start; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def post(url: str, body: dict[str, Any]) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)


def loaded_tokens(engines: list[str]) -> dict[str, int]:
    """Tokens loaded so far from kvtier's tiers, per tier kind, over ``engines``."""
    out: dict[str, int] = {}
    for url in engines:
        info = get_json(f"{url}/kvtier/info")
        kinds = {t["name"]: t["kind"] for t in info["tiers"]}
        for name, reads in info["reads"].items():
            kind = kinds.get(name, name)
            out[kind] = out.get(kind, 0) + reads["bytes"] // int(info["bytes_per_token"])
    return out


def chat_row(
    policy: str, url: str, engines: list[str], args: argparse.Namespace, bar: tqdm
) -> dict[str, Any]:
    before = loaded_tokens(engines)
    turns = asyncio.run(
        workload.chat(
            url,
            MODEL,
            args.users,
            args.turns,
            args.context,
            args.answer,
            f"bench-{policy}-{time.time()}",
            args.seed,
            progress=bar,
        )
    )
    after = loaded_tokens(engines)
    ok = [t for t in turns if t.ttft_s is not None]
    ttfts = [t.ttft_s for t in ok if t.ttft_s is not None]
    back = [t.ttft_s for t in ok if t.turn > 0 and t.ttft_s is not None]
    hits = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    cached = sum(t.cached_tokens for t in ok)
    hits["vllm_prefix_cache"] = max(cached - sum(hits.values()), 0)
    return {
        "policy": policy,
        "ttft_mean_s": _r(sum(ttfts) / len(ttfts)) if ttfts else None,
        "ttft_first_p50_s": _r(
            workload.percentile([t.ttft_s for t in ok if t.turn == 0 and t.ttft_s is not None], 0.5)
        ),
        "ttft_returning_p50_s": _r(workload.percentile(back, 0.5)),
        "ttft_p99_s": _r(workload.percentile(ttfts, 0.99)),
        "requests": len(turns),
        "errors": len(turns) - len(ok),
        "prompt_tokens": sum(t.prompt_tokens for t in ok),
        "hit_tokens": hits,
    }


def overhead_ms(url: str, args: argparse.Namespace) -> tuple[list[float], list[int]]:
    """Router overhead of a long chat's turns (and their prompt tokens) while two streams keep
    the engines busy. The chat starts 300 tokens short of ``--overhead-tokens`` and grows by
    turns, within the model's 8,192."""

    async def run() -> tuple[list[float], list[int]]:
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            busy = [
                asyncio.create_task(workload.decode_until(session, url, MODEL, i, stop, "busy"))
                for i in range(2)
            ]
            await asyncio.sleep(3.0)
            salt = f"overhead-{time.time()}"
            turns = await workload.chat(
                url, MODEL, 2, 6, args.overhead_tokens - 300, 8, salt, args.seed, concurrency=1
            )
            stop.set()
            await asyncio.gather(*busy)
        ok = [t for t in turns if t.router_ms is not None]
        return [t.router_ms for t in ok if t.router_ms is not None], [t.prompt_tokens for t in ok]

    return asyncio.run(run())


def pd_row(mode: str, url: str, args: argparse.Namespace, bar: tqdm) -> dict[str, Any]:
    mix = asyncio.run(
        workload.pd_mix(
            url,
            MODEL,
            args.streams,
            args.long,
            args.every,
            args.long_tokens,
            f"bench-{mode}-{time.time()}",
            args.seed,
            progress=bar,
        )
    )
    return {
        "mode": mode,
        "ttft_p50_s": _r(workload.percentile(mix.long_ttft_s, 0.5)),
        "itl_p50_s": _r(workload.percentile(mix.gaps_s, 0.5)),
        "itl_p99_s": _r(workload.percentile(mix.gaps_s, 0.99)),
        "requests": mix.requests,
        "errors": mix.errors,
        "long_prompts_on": mix.where,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def run(args: argparse.Namespace) -> int:
    if min(args.users, args.turns, args.streams, args.long) < 1:
        raise KvtierError("--users, --turns, --streams and --long must be at least 1")
    if not 1000 <= args.overhead_tokens <= 8000 or not 256 <= args.context <= 6000:
        raise KvtierError(
            "--overhead-tokens must be in [1000, 8000] and --context in"
            " [256, 6000] (the model takes 8,192 tokens)"
        )
    dtype = host_dtype(args.dtype, has_gpu())  # one choice for every pod: comparable runs
    print(f"kvtier bench pod: {dtype.summary()}", file=sys.stderr)
    engines = dtype.serve_options()
    dram = (
        parse_size(args.dram, "--dram")
        if args.dram
        else int(DRAM_SHARE * contexts_bytes(args, dtype))
    )
    routing: list[dict[str, Any]] = []
    pd: list[dict[str, Any]] = []
    overheads: list[float] = []
    overhead_tokens: list[int] = []
    phases: dict[str, float] = {}
    parts = ("routing" not in args.skip) * 3 * args.users * args.turns
    parts += ("pd" not in args.skip) * 2 * args.long
    with (
        tempfile.TemporaryDirectory(prefix="kvtier-bench-pod-") as tmp,
        tqdm(total=parts, desc="bench pod", unit="req") as bar,
    ):
        work = Path(tmp)
        if "routing" not in args.skip:
            bar.set_postfix_str("round-robin, no shared tier")
            with pod(
                ["--redis", "none", "--policy", "round-robin", *engines], work, "rr-local", dram
            ) as (p, s):
                urls = [e["url"] for e in s["engines"]]
                routing.append(chat_row("round-robin", p.url, urls, args, bar))
        with pod(engines, work, "colocated", dram) as (p, s):
            urls = [e["url"] for e in s["engines"]]
            if "routing" not in args.skip:
                bar.set_postfix_str("round-robin over the shared tier")
                with round_robin_router(urls, work / "rr-router.log") as rr:
                    routing.append(chat_row("round-robin+shared", rr, urls, args, bar))
                bar.set_postfix_str("kvtier routing")
                routing.append(chat_row("kvtier", p.url, urls, args, bar))
                bar.set_postfix_str("router overhead")
                overheads, overhead_tokens = overhead_ms(p.url, args)
                phases = get_json(f"{p.url}/router/state")["overhead_phases_ms_p99"]
            if "pd" not in args.skip:
                bar.set_postfix_str("colocated, streams + long prompts")
                pd.append(pd_row("colocated", p.url, args, bar))
        if "pd" not in args.skip:
            disaggregated = ["--prefill", "1", "--decode", "1", *engines]
            with pod(disaggregated, work, "disaggregated", dram) as (p, s):
                bar.set_postfix_str("disaggregated, streams + long prompts")
                pd.append(pd_row("disaggregated", p.url, args, bar))
    result = {
        "measured": (
            f"kvtier pod over HTTP, 2 engines on one core each; {args.users} users x"
            f" {args.turns} turns, {args.context}-token documents, {args.answer}-token answers,"
            f" 2 at a time; each engine's DRAM tier {dram / 2**20:.0f} MiB (no disk tier),"
            f" {dram / contexts_bytes(args, dtype):.0%} of the users' contexts; P/D:"
            f" {args.streams} streams decoding while {args.long} cold"
            f" {args.long_tokens}-token prompts arrive every {args.every:g} s; {dtype.summary()}"
        ),
        "engine_dtype": dtype.as_dict(),
        "routing": routing,
        "pd": pd,
        "router_overhead_ms_p99": _r(workload.percentile(overheads, 0.99)),
        "router_overhead_ms": [round(x, 2) for x in overheads],
        "router_overhead_prompt_tokens": overhead_tokens,
        "router_phases_ms_p99": phases,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def print_table(result: dict[str, Any]) -> None:
    print(result["measured"])
    print(
        f"{'policy':<20}{'mean TTFT':>11}{'first p50':>11}{'return p50':>12}{'p99':>9}"
        f"{'errors':>8}  hit tokens"
    )
    for row in result["routing"]:
        print(
            f"{row['policy']:<20}{row['ttft_mean_s'] or 0:>10.3f}s"
            f"{row['ttft_first_p50_s'] or 0:>10.3f}s{row['ttft_returning_p50_s'] or 0:>11.3f}s"
            f"{row['ttft_p99_s'] or 0:>8.3f}s{row['errors']:>8}"
            f"  {row['hit_tokens']}"
        )
    if result["pd"]:
        print(f"{'mode':<20}{'TTFT p50':>11}{'ITL p50':>11}{'ITL p99':>11}{'errors':>8}")
        for row in result["pd"]:
            print(
                f"{row['mode']:<20}{row['ttft_p50_s'] or 0:>10.3f}s"
                f"{row['itl_p50_s'] or 0:>10.3f}s{row['itl_p99_s'] or 0:>10.3f}s"
                f"{row['errors']:>8}"
            )
    if result["router_overhead_ms_p99"] is not None:
        print(f"router overhead p99: {result['router_overhead_ms_p99']} ms")
