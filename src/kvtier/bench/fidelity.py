"""``kvtier bench fidelity``: what each KV codec costs in quality, on the served model.

The bench writes its own long contexts (no downloads): several thousand tokens of plain
sentences with eight facts spread through them ("The locker code of Ada Brown is 4831."),
followed by a question about each fact. For each context the model computes the context's KV
once, in the engine's dtype (kvtier's reference: what it stores raw); each codec then stores
and decodes that KV chunk by chunk (256 tokens, as kvtier stores it), and the model continues
from it:

- teacher-forced: the questions and their reference answers are fed after the context, and
  the next-token distributions compared with the reference's: KL(reference || codec) per
  position (mean, p99) and top-1 agreement, over every position of every question;
- greedy: 32 tokens generated after each question, position by position against the
  reference's, and whether the answer holds the fact's value (accuracy, beside the
  reference's own).

The same measures are taken of the engine's own noise (``floor``): the context's KV computed
again in 256-token pieces, each attending to the KV before it, as chunked prefill and every
prefix hit compute it. That is the same KV mathematically; in fp32 it agrees to the last bit
or nearly, in bf16 its rounding moves the continuation about as much as int8 does (top-1
ties in bf16 logits flip). The gate (:mod:`kvtier.gate`) allows a codec one point of top-1
agreement beyond this floor.

The model runs in transformers (its cache holds keys after RoPE, as vLLM's does), so the
codec sees the values kvtier would store. One thread count and dtype for every path.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtier import quant

FIRST = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Iris", "Jon", "Kai", "Lea"]
LAST = ["Brown", "Ortiz", "Kim", "Novak", "Patel", "Silva", "Weber", "Young", "Zhou", "Moreau"]
THINGS = ["locker code", "room number", "badge number", "desk number", "parking spot"]
# Filler: plain sentences around the facts, so that the context is long and the facts few.
PLACES = [
    "the harbour",
    "the old mill",
    "the north field",
    "the library",
    "the station",
    "the market square",
    "the river bank",
    "the hill farm",
    "the school yard",
    "the bakery",
]
EVENTS = [
    "the morning was quiet",
    "a light rain fell",
    "the wind turned east",
    "a delivery arrived late",
    "the lamps were lit early",
    "a choir practised",
    "the bridge was repainted",
    "two boats came in",
    "the bell rang twice",
    "the shutters stayed closed",
]
WHEN = [
    "On Monday",
    "On a cold Tuesday",
    "Late on Wednesday",
    "Early on Thursday",
    "On Friday",
    "Over the weekend",
    "In spring",
    "In the autumn",
    "At dawn",
    "At dusk",
]
CHUNK = 256
GREEDY = 32
FACTS = 8
FLOOR = "recomputed"  # the floor's row: the reference KV computed again in CHUNK pieces


@dataclass
class Question:
    text: str  # asked after the context
    answer: str  # the reference continuation's start: the fact's value, as stated
    value: str


def make_context(seed: int, tokens: int) -> tuple[str, list[Question]]:
    """About ``tokens`` tokens of filler sentences with eight facts spread through them, and
    a question about each fact. (A 135M model cannot pick one fact among hundreds of alike
    ones; it finds one of a few in a long text.)"""
    rng = random.Random(seed)
    facts: list[tuple[str, str, str]] = []
    while len(facts) < FACTS:
        who, what = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(THINGS)
        if all(who != w for w, _, _ in facts):
            facts.append((who, what, str(rng.randint(1000, 9999))))
    sentences = [
        f"{rng.choice(WHEN)} at {rng.choice(PLACES)}, {rng.choice(EVENTS)}."
        for _ in range(max(FACTS, tokens // 14))  # ~14 tokens a sentence
    ]
    step = len(sentences) // FACTS
    for i, (who, what, value) in enumerate(facts):
        sentences.insert(i * (step + 1) + rng.randrange(step), f"The {what} of {who} is {value}.")
    questions = [
        Question(
            f"\nQuestion: What is the {what} of {who}?\nAnswer: The {what} of {who} is",
            f" {value}.",
            value,
        )
        for who, what, value in facts
    ]
    return " ".join(sentences), questions


def roundtrip(codec: str, kv: Any) -> Any:
    """``kv`` ``(layers, 2, tokens, heads, dim)`` stored by ``codec`` chunk by chunk and
    decoded ("none": as it is)."""
    import torch

    if codec == "none":
        return kv
    parts = []
    for start in range(0, kv.shape[2], CHUNK):
        piece = kv[:, :, start : start + CHUNK].contiguous()
        stored = quant.encode(codec, piece)
        parts.append(quant.decode(codec, stored, tuple(piece.shape), kv.dtype))
    return torch.cat(parts, dim=2)


class Model:
    """A causal LM and its tokenizer, with the context's KV as kvtier's chunk layout."""

    def __init__(self, path: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def ids(self, text: str) -> Any:
        return self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    def context_kv(self, ids: Any) -> Any:
        """The context's KV, ``(layers, 2, tokens, kv_heads, head_dim)``."""
        with self.torch.inference_mode():
            cache = self.lm(ids, use_cache=True).past_key_values
        layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        return self.torch.stack([self.torch.stack([k, v]) for k, v in layers]).transpose(2, 3)

    def context_kv_in_pieces(self, ids: Any, piece: int = CHUNK) -> Any:
        """:meth:`context_kv` computed ``piece`` tokens at a time, each piece attending to
        the cache of those before it (chunked prefill; a prefix hit's continuation)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        with self.torch.inference_mode():
            for start in range(0, ids.shape[1], piece):
                part = ids[:, start : start + piece]
                cache = self.lm(part, past_key_values=cache, use_cache=True).past_key_values
        layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        return self.torch.stack([self.torch.stack([k, v]) for k, v in layers]).transpose(2, 3)

    def _cache(self, kv: Any) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        per_head = kv.transpose(2, 3)  # (layers, 2, heads, tokens, dim)
        for i in range(kv.shape[0]):
            cache.update(per_head[i, 0][None].clone(), per_head[i, 1][None].clone(), i)
        return cache

    def forced(self, kv: Any, ids: Any) -> Any:
        """Log-probabilities of every position of ``ids`` fed after the context's ``kv``."""
        with self.torch.inference_mode():
            out = self.lm(ids, past_key_values=self._cache(kv), use_cache=True)
        return self.torch.log_softmax(out.logits[0].float(), dim=-1)

    def greedy(self, kv: Any, ids: Any, n: int) -> list[int]:
        """``n`` tokens generated greedily after the context's ``kv`` and ``ids``."""
        torch = self.torch
        cache, out, step = self._cache(kv), [], ids
        with torch.inference_mode():
            for _ in range(n):
                logits = self.lm(step, past_key_values=cache, use_cache=True).logits
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                step = torch.tensor([[nxt]])
        return out


def measure(
    model: Model,
    codecs: list[str],
    contexts: int = 6,
    tokens: int = 3000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per codec: KL mean and p99, top-1 agreement, greedy agreement and answer accuracy
    against the reference (the uncompressed KV), and the same for the engine's own noise
    (``floor``: the KV recomputed in pieces, see the module's docstring)."""
    torch = model.torch
    measured = [*codecs, FLOOR]
    kl: dict[str, list[float]] = {c: [] for c in measured}
    top1: dict[str, list[bool]] = {c: [] for c in measured}
    agree: dict[str, list[float]] = {c: [] for c in measured}
    right: dict[str, list[bool]] = {c: [] for c in ["none", *measured]}
    lengths = []
    began = time.perf_counter()
    for seed in range(contexts):
        text, questions = make_context(seed, tokens)
        ids = model.ids(text)
        lengths.append(int(ids.shape[1]))
        ref_kv = model.context_kv(ids)
        stored = {c: roundtrip(c, ref_kv) for c in codecs}
        stored[FLOOR] = model.context_kv_in_pieces(ids)
        for n, q in enumerate(questions, 1):
            asked = model.ids(q.text)
            forced = torch.cat([asked, model.ids(q.answer)], dim=1)
            ref_lp = model.forced(ref_kv, forced)
            ref_out = model.greedy(ref_kv, asked, GREEDY)
            right["none"].append(q.value in model.tok.decode(ref_out))
            for c in measured:
                lp = model.forced(stored[c], forced)
                kl[c] += (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).tolist()
                top1[c] += (ref_lp.argmax(-1) == lp.argmax(-1)).tolist()
                out = model.greedy(stored[c], asked, GREEDY)
                agree[c].append(sum(a == b for a, b in zip(out, ref_out, strict=True)) / GREEDY)
                right[c].append(q.value in model.tok.decode(out))
            if progress is not None:
                progress(f"context {seed + 1}/{contexts}, question {n}/{len(questions)}")
    rows = []
    for c in measured:
        ordered = sorted(kl[c])
        rows.append(
            {
                "codec": c,
                "positions": len(ordered),
                "kl_mean": sum(ordered) / len(ordered),
                "kl_p99": ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)],
                "top1_agreement": sum(top1[c]) / len(top1[c]),
                "greedy_agreement": sum(agree[c]) / len(agree[c]),
                "accuracy": sum(right[c]) / len(right[c]),
            }
        )
    return {
        "context_tokens": lengths,
        "questions": len(right["none"]),
        "reference_accuracy": sum(right["none"]) / len(right["none"]),
        "seconds": time.perf_counter() - began,
        "codecs": rows[:-1],
        "floor": rows[-1],
    }
