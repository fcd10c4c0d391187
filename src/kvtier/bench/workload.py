"""Workloads for ``kvtier bench pod``: users who chat over HTTP through a router, as people do.

:func:`chat` plays multi-turn conversations: each user's first turn carries a long document of
their own, each later turn adds the previous answer and a short question, so a user's context
grows by turns. Turns arrive in a seeded random interleaving of users, ``concurrency`` at a
time; a user's turns are sent in order. :func:`pd_mix` plays streams that decode while long
cold prompts arrive at a fixed interval: the inter-token latency of those streams and the
long prompts' time to first token. Every request streams (SSE), and times are taken on the
client side, at the first byte of content.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvtier.router.app import ENGINE_HEADER, OVERHEAD_HEADER

WORDS = [
    "tier",
    "cache",
    "memory",
    "disk",
    "shared",
    "chunk",
    "prefix",
    "token",
    "engine",
    "router",
    "decode",
    "prefill",
    "stream",
    "latency",
    "bandwidth",
    "capacity",
    "eviction",
    "request",
    "context",
    "prompt",
    "answer",
    "model",
    "server",
    "node",
    "cluster",
    "replica",
    "queue",
    "batch",
    "layer",
    "block",
    "key",
    "value",
    "index",
]


@dataclass
class Turn:
    user: int
    turn: int
    ttft_s: float | None = None  # None: failed
    engine: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    router_ms: float | None = None
    error: str = ""


def document(user: int, tokens: int, seed: int) -> str:
    """About ``tokens`` tokens of text no other user's document starts like."""
    rng = random.Random(seed * 1_000_003 + user)
    words = [f"user{user} notes:"]
    for i in range(int(tokens / 4)):  # some 4 tokens a word
        words.append(f"{rng.choice(WORDS)}{rng.randrange(1000)}")
        if i % 24 == 23:
            words[-1] += "."
    return " ".join(words)


def interleaving(users: int, turns: int, seed: int) -> list[tuple[int, int]]:
    """(user, turn) in a seeded random order that keeps each user's turns in order."""
    rng = random.Random(seed)
    slots = [u for u in range(users) for _ in range(turns)]
    rng.shuffle(slots)
    seen = [0] * users
    order = []
    for user in slots:
        order.append((user, seen[user]))
        seen[user] += 1
    return order


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    gaps: list[tuple[float, float]] | None = None,
) -> tuple[float, str, dict[str, Any], str, float | None]:
    """Send a streaming request; (TTFT s, text, usage, engine, router ms). Raises on errors."""
    started = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    last = 0.0
    async with session.post(url, json=body) as r:
        engine = r.headers.get(ENGINE_HEADER, "")
        overhead = r.headers.get(OVERHEAD_HEADER)
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices", ()):
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                if piece or choice.get("finish_reason"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - started
                    elif gaps is not None:
                        gaps.append((now, now - last))  # (when it ended, the gap)
                    last = now
                    text.append(piece or "")
    if ttft is None:
        raise RuntimeError("the stream ended without a token")
    return ttft, "".join(text), usage, engine, float(overhead) if overhead else None


async def chat(
    url: str,
    model: str,
    users: int,
    turns: int,
    context_tokens: int,
    answer_tokens: int,
    salt: str,
    seed: int = 0,
    concurrency: int = 2,
    progress: Any = None,
) -> list[Turn]:
    """Multi-turn chats through ``url`` (a router); one :class:`Turn` per request."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(users)]
    done = [0] * users
    changed = asyncio.Condition()
    order = interleaving(users, turns, seed)
    results: list[Turn] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for item in order:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                user, turn = queue.get_nowait()

                def its_turn(u: int = user, t: int = turn) -> bool:
                    return done[u] == t

                async with changed:
                    await changed.wait_for(its_turn)
                if turn == 0:
                    question = document(user, context_tokens, seed) + "\nWhat is this about?"
                else:
                    question = f"Question {turn}: what does the note say about {WORDS[turn]}?"
                messages = [*histories[user], {"role": "user", "content": question}]
                body = {
                    "model": model,
                    "messages": messages,
                    "max_tokens": answer_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "cache_salt": salt,
                    "stream_options": {"include_usage": True},
                }
                result = Turn(user, turn)
                try:
                    ttft, answer, usage, engine, overhead = await stream(
                        session, url + "/v1/chat/completions", body
                    )
                    result.ttft_s, result.engine, result.router_ms = ttft, engine, overhead
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = int(details.get("cached_tokens") or 0)
                except (RuntimeError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    result.error, answer = str(exc)[:300], "(no answer)"
                histories[user] = [*messages, {"role": "assistant", "content": answer}]
                results.append(result)
                if progress is not None:
                    progress.update(1)
                async with changed:
                    done[user] += 1
                    changed.notify_all()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


@dataclass
class MixResult:
    long_ttft_s: list[float]
    gaps_s: list[float]  # inter-token gaps of the streams while long prompts were served
    errors: int
    requests: int
    where: dict[str, int]  # engine that answered -> long prompts


async def pd_mix(
    url: str,
    model: str,
    streams: int,
    long_prompts: int,
    every_s: float,
    long_tokens: int,
    salt: str,
    seed: int = 0,
    progress: Any = None,
) -> MixResult:
    """``streams`` users decoding without pause while ``long_prompts`` cold prompts of
    ``long_tokens`` arrive every ``every_s`` seconds."""
    gaps: list[tuple[float, float]] = []
    stop = asyncio.Event()
    errors = 0
    requests = 0
    ttfts: list[float] = []
    where: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def streamer(i: int) -> None:
            nonlocal errors, requests
            sent, failed = await decode_until(session, url, model, i, stop, salt, gaps)
            requests, errors = requests + sent, errors + failed

        async def long_prompt(i: int) -> None:
            nonlocal errors, requests
            await asyncio.sleep(i * every_s)
            body = {
                "model": model,
                "prompt": document(1000 + i, long_tokens, seed) + "\nSummary:",
                "max_tokens": 4,
                "stream": True,
                "cache_salt": salt,
            }
            requests += 1
            try:
                ttft, _, _, engine, _ = await stream(session, url + "/v1/completions", body)
                ttfts.append(ttft)
                where[engine] = where.get(engine, 0) + 1
            except (RuntimeError, aiohttp.ClientError, TimeoutError, ValueError):
                errors += 1
            if progress is not None:
                progress.update(1)

        runners = [asyncio.create_task(streamer(i)) for i in range(streams)]
        await asyncio.sleep(3.0)  # the streams are decoding
        begin = time.perf_counter()
        await asyncio.gather(*(long_prompt(i) for i in range(long_prompts)))
        end = time.perf_counter()
        stop.set()
        await asyncio.gather(*runners)
    window = [gap for at, gap in gaps if begin <= at <= end]
    return MixResult(ttfts, window, errors, requests, where)


async def decode_until(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    i: int,
    stop: asyncio.Event,
    salt: str,
    gaps: list[tuple[float, float]] | None = None,
) -> tuple[int, int]:
    """One user streaming short completions back to back until ``stop``; (sent, failed)."""
    sent = failed = 0
    while not stop.is_set():
        sent += 1
        body = {
            "model": model,
            "prompt": f"Stream {i}.{sent}: count the {WORDS[sent % 30]}s:",
            "max_tokens": 48,
            "ignore_eos": True,
            "stream": True,
            "cache_salt": salt,
        }
        try:
            await stream(session, url + "/v1/completions", body, gaps)
        except (RuntimeError, aiohttp.ClientError, TimeoutError, ValueError):
            failed += 1
    return sent, failed


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
