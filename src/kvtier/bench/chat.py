"""``kvtier bench chat``: a multi-round chat whose users arrive in bursts, through ``kvtier serve``.

Each user's first turn carries a document of their own (``--history`` tokens, text, so no
prompt is a multiple of a block or a chunk); each later turn adds the previous answer
(``--answer`` tokens) and a short question. Requests come in ``--bursts`` bursts of ``--burst``:
one new user's first turn (cold) and the next turns of the users met before whose last turn is
the oldest (returning: their context is cached by kvtier, and gone from vLLM's own cache), all
sent at once, the next burst when the last answer of this one is in. Before the first burst,
``--met`` users have their first turn, all at once and not measured: enough of them (by
default) that every returning user's context has left vLLM's KV cache by the time they
return, as it has on a busy server. Every request streams over HTTP
(``/v1/chat/completions``); its TTFT is the first content byte, on the client side.

The same conversations, each in a server of its own started as users start it (engine in its
own processes, vLLM's KV cache made small with ``--num-gpu-blocks-override`` so that returning
turns' contexts come from kvtier's DRAM rather than from vLLM's own cache):

  baseline    the fair baseline: the same server, kvtier holding nothing (a 1 MiB DRAM tier
              holds no chunk, so kvtier saves none; no disk tier), vLLM's scheduling
  fcfs        kvtier, vLLM's first-come first-served scheduling (``--scheduling vllm``)
  hits-first  kvtier as ``kvtier serve`` runs by default

Then, on each server, the next turn of each of ``--isolated`` users, one at a time: an
isolated hit of the same length and history as the returning turns (a second turn, of the
bursts' new users, oldest first: see :func:`isolated_users`). Per
path: mean TTFT over all turns, first and returning turns' medians, the longest wait of a first
turn, the prompt tokens the engine computed per second of the run (prefill throughput), the
share of prompt tokens found cached (in vLLM's cache or kvtier's), and the ratios the targets
are stated in.

With ``--pod N`` each path runs on a ``kvtier pod --engines N`` instead (each engine on its own
cores, the pod's shared Redis tier, its router in front; the baseline's pod has no shared
tier): the router sends returning turns where their context is and prices the wait on a
hits-first engine as the queued work smaller than the request's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from kvtier.bench.pod import get_json, pod
from kvtier.bench.workload import WORDS, document, stream
from kvtier.config import parse_size
from kvtier.integrations.engine_dtype import DtypeChoice, host_dtype
from kvtier.integrations.engine_layout import has_gpu
from kvtier.integrations.model import DEFAULT_MODEL_NAME
from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command

MODES = {
    "baseline": ("--scheduling", "vllm", "--dram", "1MiB"),
    "fcfs": ("--scheduling", "vllm"),
    "hits-first": (),
}
# vLLM's own KV cache: 80 blocks of 128 tokens (on CPU), a burst's four prompts and little
# more, so that users' contexts are gone from it by their next turn (see users_met).
SMALL_VLLM_CACHE_BLOCKS = 80  # of vLLM's 128-token blocks on CPU
SMALL_VLLM_CACHE = (
    "--num-gpu-blocks-override",
    str(SMALL_VLLM_CACHE_BLOCKS),
    "--max-model-len",
    "8192",
)


@dataclass
class Turn:
    user: int
    turn: int
    burst: int
    ttft_s: float | None = None  # None: failed
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


class Conversations:
    """Each user's messages so far; the question of each turn."""

    def __init__(self, history_tokens: int, seed: int):
        self.history_tokens, self.seed = history_tokens, seed
        self.messages: dict[int, list[dict[str, str]]] = {}

    def next_turn(self, user: int) -> tuple[int, list[dict[str, str]]]:
        past = self.messages.get(user, [])
        turn = len(past) // 2
        if turn == 0:
            question = document(user, self.history_tokens, self.seed) + "\nWhat is this about?"
        else:
            question = f"Question {turn}: what does the note say about {WORDS[turn % 30]}?"
        return turn, [*past, {"role": "user", "content": question}]

    def answered(self, user: int, messages: list[dict[str, str]], answer: str) -> None:
        self.messages[user] = [*messages, {"role": "assistant", "content": answer}]


def users_met(size: int, history: int, engines: int = 1) -> int:
    """Users to meet before the first burst so that, with returning users taken oldest first,
    more contexts than vLLM's cache holds (on every engine) are served between two turns of a
    user: a user returns every ``met / (size - 1)`` bursts, ``size`` contexts each."""
    held = -(-SMALL_VLLM_CACHE_BLOCKS * 128 // history)  # contexts vLLM's cache holds, rounded up
    return (size - 1) * (-(-engines * held // size) + 1)


def bursts(count: int, size: int, met: int) -> tuple[list[list[int]], list[int]]:
    """The users of each burst (one new user, then ``size`` - 1 returning ones, those whose last
    turn is the oldest), and all users, oldest last turn first, after the last burst."""
    if met < size - 1:
        raise ValueError(f"{met} users met before cannot fill bursts of {size}")
    oldest_first, plan = list(range(met)), []
    for new in range(met, met + count):
        returning, oldest_first = oldest_first[: size - 1], oldest_first[size - 1 :]
        plan.append([new, *returning])
        oldest_first += [*returning, new]
    return plan, oldest_first


def isolated_users(oldest_first: list[int], plan: list[list[int]], count: int) -> list[int]:
    """Whose next turn is measured alone: users whose next turn is their second, like every
    returning turn of the bursts (the bursts' new users, oldest first: their contexts are
    gone from vLLM's cache), so that the isolated hit has the same history as the returning
    turns and the same part of it cached. (A third turn's history adds a question and an
    answer, and its whole-block part often covers the previous answer: fewer tokens to
    compute.) Then, if there are too few, the users whose last turn is the oldest."""
    returned = {u for users in plan for u in users[1:]}
    once = {users[0] for users in plan} - returned  # new in a burst, not back since
    second = [u for u in oldest_first if u in once]
    rest = [u for u in oldest_first if u not in once]
    return (second + rest)[:count]


async def _turn(
    session: aiohttp.ClientSession,
    url: str,
    chats: Conversations,
    user: int,
    burst: int,
    answer_tokens: int,
) -> Turn:
    turn, messages = chats.next_turn(user)
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": messages,
        "max_tokens": answer_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Turn(user, turn, burst)
    try:
        ttft, answer, usage, _, _ = await stream(session, url + "/v1/chat/completions", body)
        result.ttft_s = ttft
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)
    except (RuntimeError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error, answer = str(exc)[:300], "(no answer)"
    chats.answered(user, messages, answer)
    return result


async def play(url: str, args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    """The whole workload against ``url``: warm-up users, the bursts, then isolated turns."""
    chats = Conversations(args.history, args.seed)
    plan, oldest_first = bursts(args.bursts, args.burst, args.met)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def met(user: int) -> None:
            await _turn(session, url, chats, user, -1, args.answer)
            bar.update()

        await asyncio.gather(*(met(user) for user in range(args.met)))
        turns: list[Turn] = []
        started = time.perf_counter()
        for k, users in enumerate(plan):
            done = await asyncio.gather(
                *(_turn(session, url, chats, u, k, args.answer) for u in users)
            )
            turns += done
            bar.update(len(users))
        elapsed = time.perf_counter() - started
        isolated = []
        for user in isolated_users(oldest_first, plan, args.isolated):
            isolated.append(await _turn(session, url, chats, user, -2, args.answer))
            bar.update()
    return {"turns": turns, "elapsed_s": elapsed, "isolated": isolated}


def summary(played: dict[str, Any]) -> dict[str, Any]:
    turns: list[Turn] = played["turns"]
    ok = [t for t in turns if t.ttft_s is not None]
    first = [t.ttft_s for t in ok if t.turn == 0 and t.ttft_s is not None]
    returning = [t.ttft_s for t in ok if t.turn > 0 and t.ttft_s is not None]
    isolated = [t.ttft_s for t in played["isolated"] if t.ttft_s is not None]
    cached = sum(t.cached_tokens for t in ok)
    computed = sum(t.prompt_tokens for t in ok) - cached
    return {
        "requests": len(turns),
        "failed": len(turns) - len(ok),
        "mean_s": statistics.mean(t.ttft_s for t in ok if t.ttft_s is not None) if ok else None,
        "first_median_s": statistics.median(first) if first else None,
        "first_max_s": max(first) if first else None,
        "returning_median_s": statistics.median(returning) if returning else None,
        "returning_p90_s": sorted(returning)[int(0.9 * (len(returning) - 1))]
        if returning
        else None,
        "isolated_hit_s": statistics.median(isolated) if isolated else None,
        "computed_tokens": computed,
        "prefill_tokens_per_s": computed / played["elapsed_s"] if played["elapsed_s"] else None,
        "cached_fraction": cached / max(1, sum(t.prompt_tokens for t in ok)),
        "elapsed_s": played["elapsed_s"],
        "turns": [asdict(t) for t in turns],
        "isolated_turns": [asdict(t) for t in played["isolated"]],
    }


def run(args: argparse.Namespace) -> int:
    modes = [m for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES) or not modes:
        raise SystemExit(f"kvtier bench chat: --modes from {', '.join(MODES)}")
    if args.burst < 2 or args.bursts < 1 or not 256 < args.history < 7000:
        raise SystemExit("kvtier bench chat: --burst >= 2, --bursts >= 1, --history in (256, 7000)")
    if args.block_size is not None and (args.pod or not 16 <= args.block_size <= 1024):
        raise SystemExit("kvtier bench chat: --block-size from 16 to 1024, without --pod")
    if not 0 <= args.pod <= 16:
        raise SystemExit("kvtier bench chat: --pod from 0 (one kvtier serve) to 16 engines")
    if args.met is None:
        args.met = users_met(args.burst, args.history, max(1, args.pod))
    if args.met < args.burst - 1:
        raise SystemExit(f"kvtier bench chat: --met >= --burst - 1 ({args.burst - 1})")
    dtype = host_dtype(args.dtype, has_gpu())
    print(f"kvtier bench chat: {dtype.summary()}", file=sys.stderr)
    per_mode = args.met + args.bursts * args.burst + args.isolated
    bar = tqdm(total=per_mode * len(modes), desc="bench chat", unit="req", file=sys.stderr)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-chat-") as work:
        for mode in modes:
            bar.set_postfix_str(mode)
            with _deployment(Path(work), mode, dtype, args) as (url, hits_first, model_in, routed):
                rows[mode] = summary(asyncio.run(play(url, args, bar)))
                rows[mode]["model_in"] = model_in()
                rows[mode]["hits_first"] = hits_first()
                if (routing := routed()) is not None:
                    rows[mode]["routing"] = routing
    bar.close()
    result = {"rows": rows, "engine_dtype": dtype.as_dict(), **_options(args)}
    print(json.dumps(result) if args.json else report(result))
    return 0


# Its URL, whether it scheduled hits first (it says so), where the model ran, and (a pod) what
# its router decided: the reasons and the last decisions, each with its engine.
Deployment = tuple[str, Callable[[], bool], Callable[[], str], Callable[[], dict[str, Any] | None]]


@contextlib.contextmanager
def _deployment(
    work: Path, mode: str, dtype: DtypeChoice, args: argparse.Namespace
) -> Iterator[Deployment]:
    """The server a path runs on (see :data:`Deployment`)."""
    options = [*MODES[mode], "--disk", "none", *dtype.serve_options()]
    if args.block_size:  # vLLM's cache keeps its size in tokens (80 blocks of 128)
        blocks = SMALL_VLLM_CACHE_BLOCKS * 128 // args.block_size
        options += ["--block-size", str(args.block_size)]
        options += ["--num-gpu-blocks-override", str(blocks)]
    for name in ("step_s", "max_step_s"):
        if mode == "hits-first" and getattr(args, name, None) is not None:
            options += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if not args.pod:
        with _server(work, options, mode) as server:
            yield (
                server.url,
                lambda: "hits-first scheduling" in server.tail(1 << 20),
                server.model_process,
                lambda: None,
            )
        return
    if mode == "baseline":
        options += ["--redis", "none"]  # nor a shared tier
    dram = parse_size(options[options.index("--dram") + 1]) if "--dram" in options else 1 << 30
    with pod(["--engines", str(args.pod), *options], work, mode, dram) as (running, state):

        def hits_first() -> bool:
            engines = get_json(f"{running.url}/router/state")["engines"]
            return all(e.get("hits_first") for e in engines)

        def routed() -> dict[str, Any]:
            got = get_json(f"{running.url}/router/state")
            engines = [
                {k: e.get(k) for k in ("url", "prefill_tokens_per_s", "bandwidth_bytes_per_s")}
                for e in got.get("engines", [])
            ]
            return {"reasons": got.get("reasons"), "recent": got.get("recent"), "engines": engines}

        yield (
            running.url,
            hits_first,
            lambda: f"kvtier pod, {len(state['engines'])} engines",
            routed,
        )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "bursts",
        "burst",
        "met",
        "history",
        "answer",
        "isolated",
        "step_s",
        "max_step_s",
        "seed",
        "pod",
    )
    return {k: getattr(args, k) for k in keys}


def _server(work: Path, options: list[str], mode: str) -> Server:
    port = free_port()
    command = kvtier_serve_command(port, *SMALL_VLLM_CACHE, *options)  # options last: they win
    return Server(command, port, work / f"{mode}.log", warm_up=True)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    out = [
        "kvtier bench chat: {bursts} bursts of {burst} (one first turn, the rest returning turns"
        " of users met before, oldest first; {met} met before the first),"
        " {history}-token documents, {answer}-token answers; TTFT over HTTP through"
        " {through}, in seconds".format(
            through=f"kvtier pod ({result['pod']} engines, router)"
            if result.get("pod")
            else "kvtier serve",
            **result,
        ),
        f"  measured on: {DtypeChoice.from_dict(result['engine_dtype']).summary()}",
        f"  {'path':<11}{'mean':>8}{'first':>8}{'first max':>10}{'return':>8}{'ret p90':>8}"
        f"{'isolated':>9}{'tok/s':>8}{'cached':>8}{'failed':>7}",
    ]
    for mode, r in rows.items():
        cells = [r["mean_s"], r["first_median_s"], r["first_max_s"], r["returning_median_s"]]
        cells += [r["returning_p90_s"], r["isolated_hit_s"]]
        text = [f"{c:8.2f}" if c is not None else f"{'-':>8}" for c in cells]
        out.append(
            f"  {mode:<11}{text[0]}{text[1]}{text[2]:>10}{text[3]}{text[4]}{text[5]:>9}"
            f"{r['prefill_tokens_per_s'] or 0:8.0f}{r['cached_fraction']:8.0%}{r['failed']:7d}"
        )
    hf, fc, base = rows.get("hits-first"), rows.get("fcfs"), rows.get("baseline")
    if hf:
        got = _ratio(hf["returning_median_s"], hf["isolated_hit_s"])
        out.append(f"  hits-first: returning median / isolated hit {got} (target <= 2x)")
    if hf and base:
        got = _ratio(base["mean_s"], hf["mean_s"])
        out.append(f"  mean TTFT, baseline / hits-first: {got} (target >= 5x)")
    if hf and fc:
        first = _ratio(hf["first_median_s"], fc["first_median_s"])
        rate = _ratio(hf["prefill_tokens_per_s"], fc["prefill_tokens_per_s"])
        out.append(
            f"  first turns' median, hits-first / fcfs: {first} (target <= 1.25x);"
            f" prefill throughput, hits-first / fcfs: {rate} (target >= 0.9x)"
        )
    if fc and base:
        out.append(f"  mean TTFT, baseline / fcfs: {_ratio(base['mean_s'], fc['mean_s'])}")
    return "\n".join(out)
