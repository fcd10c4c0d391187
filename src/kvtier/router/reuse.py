"""Routing precision: what the router predicted an engine would reuse of each prompt, against
what the engine says it reused (``usage.prompt_tokens_details.cached_tokens`` of its answer:
vLLM's prefix cache plus kvtier's loads; `kvtier serve` turns it on).

Precision = predicted tokens that were reused / predicted tokens; coverage = the same / reused
tokens (the share of what the engines reused that the router had expected). The last :data:`RECENT`
decisions are kept for the console.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

RECENT = 50
TAIL_BYTES = 8192  # a stream's usage is in its last events


@dataclass
class Decision:
    """One request's routing, and (once answered) what its engine reused."""

    t: float
    engine: str
    reason: str
    tokens: int  # prompt tokens, as the router counted them when it chose
    predicted: int  # tokens the router expected the engine to reuse
    reused: int | None = None  # what the engine said it reused (None: it did not say)
    measured: bool = True  # False where an intermediate step (a prefill engine) skews it


class Decisions:
    def __init__(self) -> None:
        self.recent: deque[Decision] = deque(maxlen=RECENT)
        self.measured = 0
        self.predicted_tokens = 0
        self.reused_tokens = 0
        self.matched_tokens = 0  # sum of min(predicted, reused)

    def record(self, engine: str, reason: str, tokens: int, predicted: int) -> Decision:
        decision = Decision(time.time(), engine, reason, tokens, predicted)
        self.recent.append(decision)
        return decision

    def answered(self, decision: Decision, reused: int | None) -> None:
        if reused is None or decision.reused is not None:
            return
        decision.reused = reused
        if decision.measured:
            self.measured += 1
            self.predicted_tokens += decision.predicted
            self.reused_tokens += reused
            self.matched_tokens += min(decision.predicted, reused)

    def state(self) -> dict[str, Any]:
        return {
            "measured": self.measured,
            "predicted_tokens": self.predicted_tokens,
            "reused_tokens": self.reused_tokens,
            "matched_tokens": self.matched_tokens,
            "precision": self.matched_tokens / self.predicted_tokens
            if self.predicted_tokens
            else None,
            "coverage": self.matched_tokens / self.reused_tokens if self.reused_tokens else None,
        }

    def recent_state(self) -> list[dict[str, Any]]:
        return [asdict(d) for d in self.recent]


def cached_tokens(answer: dict[str, Any]) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` of an answer (None when absent)."""
    usage = answer.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) else None


def cached_in_body(body: bytes) -> int | None:
    if b'"cached_tokens"' not in body:  # most answers, when usage details are off: no parse
        return None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return cached_tokens(answer) if isinstance(answer, dict) else None


def cached_in_stream(tail: bytes) -> int | None:
    """The cached tokens in a stream's last events (there when the client asked for usage)."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            found = cached_in_body(line[5:].strip())
            if found is not None:
                return found
    return None
