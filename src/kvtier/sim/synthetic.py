"""Synthetic workloads for ``kvtier sim``, as Mooncake-format requests.

- ``chat``: ``users`` conversations of ``turns`` turns behind one shared system prompt; each
  turn's prompt is the system prompt, the whole history (messages and replies) and a new
  message, so turn t reuses turn t-1's prompt and reply.
- ``rag``: ``rag_requests`` questions, each behind the system prompt and one of ``docs``
  documents picked with Zipf popularity (a few documents are asked about most).
- ``mixed``: both at once.

Block ids follow the trace convention: a 512-token block's id names the block's content and
everything before it, so two prompts share a block id exactly when they share that prefix.
Lengths vary uniformly by +-50% around the given means; everything is seeded.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from kvtier.errors import ConfigError
from kvtier.sim.trace import BLOCK_TOKENS, Request

WORKLOADS = ("chat", "rag", "mixed")


@dataclass(frozen=True)
class Workload:
    kind: str = "chat"
    users: int = 200
    turns: int = 6
    system_tokens: int = 2048
    message_tokens: int = 300
    reply_tokens: int = 400
    think_s: float = 60.0  # mean pause between a reply and the user's next message
    window_s: float = 3600.0  # conversations start and RAG questions arrive over this span
    docs: int = 500
    doc_tokens: int = 4096
    rag_requests: int = 2000
    zipf: float = 1.1
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in WORKLOADS:
            raise ConfigError(f"unknown workload {self.kind!r}; allowed: {', '.join(WORKLOADS)}")
        for name in ("users", "turns", "docs", "doc_tokens", "message_tokens", "reply_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"workload {name} must be at least 1, got {getattr(self, name)}")
        if self.system_tokens < 0 or self.rag_requests < 0:
            raise ConfigError("workload system_tokens and rag_requests must not be negative")
        if self.think_s < 0 or self.window_s < 0 or self.zipf <= 0:
            raise ConfigError("workload think_s and window_s must be >= 0, and zipf > 0")


class _Ids:
    """Dense integer ids for block identities."""

    def __init__(self) -> None:
        self._ids: dict[Hashable, int] = {}
        self._next = itertools.count()

    def blocks(self, segments: Sequence[tuple[Hashable, int]], length: int) -> tuple[int, ...]:
        """Ids of the blocks of a prompt made of ``segments`` (owner, tokens), cut at length.

        A block is named by the owner of its last token's segment and its end offset: equal
        names mean an equal prefix, because an owner's content never changes once written.
        """
        bounds = list(itertools.accumulate(n for _, n in segments))
        out = []
        for start in range(0, length, BLOCK_TOKENS):
            end = min(start + BLOCK_TOKENS, length)
            owner = segments[min(bisect.bisect_left(bounds, end), len(segments) - 1)][0]
            name = (owner, end)
            if (i := self._ids.get(name)) is None:
                i = self._ids[name] = next(self._next)
            out.append(i)
        return tuple(out)


def _vary(rng: random.Random, mean: int) -> int:
    return max(1, round(mean * rng.uniform(0.5, 1.5)))


def generate(w: Workload) -> list[Request]:
    """The workload's requests in timestamp order."""
    w.validate()
    rng = random.Random(w.seed)
    ids = _Ids()
    requests: list[Request] = []
    system = [("system", w.system_tokens)] if w.system_tokens else []
    if w.kind in ("chat", "mixed"):
        for user in range(w.users):
            t = rng.uniform(0, w.window_s)
            history = 0
            for _ in range(w.turns):
                length = w.system_tokens + history + _vary(rng, w.message_tokens)
                reply = _vary(rng, w.reply_tokens)
                segments = [*system, (("user", user), length + reply)]
                requests.append(Request(t * 1e3, length, reply, ids.blocks(segments, length)))
                history = length - w.system_tokens + reply
                t += rng.expovariate(1 / w.think_s) if w.think_s else 0.0
    if w.kind in ("rag", "mixed"):
        weights = list(itertools.accumulate(1 / (d + 1) ** w.zipf for d in range(w.docs)))
        for question in range(w.rag_requests):
            doc = bisect.bisect_left(weights, rng.uniform(0, weights[-1]))
            asked = _vary(rng, 100)
            length = w.system_tokens + w.doc_tokens + asked
            segments = [*system, (("doc", doc), w.doc_tokens), (("question", question), asked)]
            t = rng.uniform(0, w.window_s)
            requests.append(Request(t * 1e3, length, _vary(rng, 200), ids.blocks(segments, length)))
    requests.sort(key=lambda r: r.timestamp_ms)
    return requests
