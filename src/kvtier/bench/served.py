"""``kvtier bench fidelity --served``: each codec through the product, as users get it.

The model-level measure (:mod:`kvtier.bench.fidelity`) runs the model in transformers, whose
cache holds each token's K and V apart. An engine's cache may not: vLLM's AMX kernel packs
whole blocks of K and V together, and a chunk of it is opaque bytes to a codec. So the same
questions go through ``kvtier serve`` too:

- a cold server (DRAM + a real Redis tier, raw) answers every question of every context, each
  request greedy, 32 tokens; its chunks reach Redis as it stops;
- per codec, Redis's chunks are recoded into that codec under a prefix of their own (kvtier's
  own recode, as a tier's write-behind runs it), and a restarted server whose Redis tier
  stores that codec (``--codec redis=NAME``) answers the same questions: the context's KV comes
  from Redis (the first question of a context) or from the DRAM copy that load promoted, in
  the stored form either way, decoded into vLLM's blocks; vLLM's own prefix cache is off;
- ``none`` is the same restart reading the raw chunks.

Per codec, against the raw chunks' restart (the model-level measure's reference too: the
continuation from the uncompressed KV, computed the same way) and against the cold server
(which computed each context whole, with vLLM's prefix cache: another split into steps, whose
bf16 rounding alone changes answers): answers identical, greedy agreement (position by position
over 32 tokens, as the model-level measure counts it); accuracy on the facts, and the prompt
tokens the engine did not compute (the hit). A codec passes when its greedy agreement with the
raw chunks' answers is at most :data:`MARGIN` below the one the model-level measure found for
it: the product does what the gate measured (a codec applied to the wrong bytes falls far
below).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.bench import fidelity
from kvtier.bench.common import NO_PREFIX_CACHE, SERVE_OPTIONS, copy_chunks
from kvtier.codec import Compression
from kvtier.integrations.engine_dtype import DtypeChoice
from kvtier.recode import recode
from kvtier.redis_process import RedisServer, free_port
from kvtier.runtime.engine_process import Completion, Server, kvtier_serve_command
from kvtier.tiers.redis import RedisTier

MARGIN = 0.10  # greedy agreement a codec may lose through the product, against the model's
RAW_PREFIX = "kvtier"  # the cold server's chunks (kvtier serve's default Redis prefix)


def questions(contexts: int, tokens: int) -> list[tuple[str, str]]:
    """(prompt, the fact's value) of every question of every context, as the model-level
    measure asks them."""
    asked = []
    for seed in range(contexts):
        text, qs = fidelity.make_context(seed, tokens)
        asked += [(text + q.text, q.value) for q in qs]
    return asked


def measure(
    codecs: list[str],
    contexts: int,
    tokens: int,
    dtype: DtypeChoice,
    work: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Cold answers, then each codec's (``none`` first) from a restarted server; see the
    module's docstring."""
    asked = questions(contexts, tokens)
    options = [*SERVE_OPTIONS, *dtype.serve_options(), "--disk", "none"]
    with RedisServer() as redis:
        progress(f"cold server: {len(asked)} questions")
        with _server(work, "cold", [*options, "--redis", redis.url, "--codec", "none"]) as cold:
            reference = [_ask(cold, prompt) for prompt, _ in asked]
        rows, raw = [], reference
        for name in ["none", *codecs]:
            prefix = RAW_PREFIX if name == "none" else f"served_{name}"
            if name != "none":
                compression = Compression.named(name)
                copy_chunks(
                    RedisTier(redis.url, prefix=RAW_PREFIX),
                    RedisTier(redis.url, prefix=prefix),
                    lambda blob, c=compression: recode(blob, c),  # type: ignore[misc]
                )
            config = work / f"served_{name}.yaml"
            tier = {"kind": "redis", "url": redis.url, "prefix": prefix}
            config.write_text(json.dumps({"tiers": [{"kind": "memory"}, tier]}))
            coded = ["--config", str(config), "--codec", f"redis={name}", *NO_PREFIX_CACHE]
            if name != "none":
                coded.append("--force-codec")  # measured here, whatever the gate says
            progress(f"{name}: a restarted server, {len(asked)} questions")
            with _server(work, name, [*options, *coded]) as again:
                answers = [_ask(again, prompt) for prompt, _ in asked]
            if name == "none":
                raw = answers
            rows.append(_row(name, raw, reference, answers, [value for _, value in asked]))
    return {
        "questions": len(asked),
        "cold_accuracy": sum(v in r.text for r, (_, v) in zip(reference, asked, strict=True))
        / len(asked),
        "rows": rows,
    }


def judge(served: dict[str, Any], model_rows: list[dict[str, Any]]) -> None:
    """Mark each served row passed or not against the model-level row of its codec (rows
    without one, and ``none``, are not judged). A row whose restarted server computed more
    than half of its prompts itself measured nothing, and fails (``none``'s too: then
    nothing was)."""
    model = {r["codec"]: r for r in model_rows}
    raw = next(r for r in served["rows"] if r["codec"] == "none")
    raw_loaded = raw["hit_tokens"] >= raw["prompt_tokens"] / 2
    for row in served["rows"]:
        measured = model.get(row["codec"])
        row["model_greedy_agreement"] = measured["greedy_agreement"] if measured else None
        loaded = row["hit_tokens"] >= row["prompt_tokens"] / 2 and raw_loaded
        row["passed"] = (
            None
            if measured is None or row["codec"] == "none"
            else loaded and row["greedy_agreement"] >= measured["greedy_agreement"] - MARGIN
        )


def _server(work: Path, label: str, options: list[str]) -> Server:
    port = free_port()
    return Server(
        kvtier_serve_command(port, *options), port, work / f"served_{label}.log", warm_up=True
    )


def _ask(server: Server, prompt: str) -> Completion:
    return server.complete(
        prompt,
        max_tokens=fidelity.GREEDY,
        ignore_eos=True,
        logprobs=0,
        return_tokens_as_token_ids=True,
    )


def _row(
    name: str,
    raw: list[Completion],
    cold: list[Completion],
    answers: list[Completion],
    values: list[str],
) -> dict[str, Any]:
    return {
        "codec": name,
        "identical": _identical(raw, answers),
        "greedy_agreement": _agreement(raw, answers),
        "identical_cold": _identical(cold, answers),
        "greedy_agreement_cold": _agreement(cold, answers),
        "accuracy": sum(v in a.text for v, a in zip(values, answers, strict=True)) / len(values),
        "hit_tokens": sum(a.cached_tokens or 0 for a in answers),
        "prompt_tokens": sum(a.prompt_tokens for a in answers),
    }


def _identical(reference: list[Completion], answers: list[Completion]) -> int:
    return sum(r.text == a.text for r, a in zip(reference, answers, strict=True))


def _agreement(reference: list[Completion], answers: list[Completion]) -> float:
    """Mean share of the GREEDY positions where the answers' tokens are the reference's."""
    agree = [
        sum(a == b for a, b in zip(ref.tokens, got.tokens, strict=False)) / fidelity.GREEDY
        for ref, got in zip(reference, answers, strict=True)
    ]
    return sum(agree) / len(agree)
