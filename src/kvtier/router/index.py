"""The router's index: chunk key -> {engine: tier kinds}, fed by every engine's feed.

Each engine's part is replaced whole by a snapshot and then kept by its events, in sequence
order (the feed reader resyncs on a gap or a new epoch; see :mod:`kvtier.integrations.feed`).
Requests routed to an engine but not yet reported by its events count as *predicted* residency
there, so that a burst of requests sharing a prefix follows the first one instead of
scattering, and a user's next turn finds the engine its last turn went to.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PREDICTED_S = 120.0  # how long a prediction stands without an event confirming it
STALENESS_WINDOW = 1024  # staleness samples kept for the percentiles


@dataclass
class Staleness:
    """Seconds between an event at the engine and its arrival in the index."""

    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(max(seconds, 0.0))
        if len(self.samples) > STALENESS_WINDOW:
            del self.samples[: len(self.samples) - STALENESS_WINDOW]

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {"n": 0}
        ordered = sorted(self.samples)
        return {
            "n": len(ordered),
            "p50_s": quantile(ordered, 0.5),
            "p99_s": quantile(ordered, 0.99),
            "max_s": ordered[-1],
        }


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted ``ordered`` (nearest rank; 0 when empty)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class ChunkIndex:
    """Where each chunk is. Not thread-safe: the router uses it from its event loop only."""

    def __init__(self) -> None:
        self._where: dict[str, dict[str, set[str]]] = {}  # hex key -> engine -> tier kinds
        self._predicted: dict[str, dict[str, float]] = {}  # engine -> hex key -> expiry
        self.staleness = Staleness()
        self.resyncs: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def replace(self, engine: str, entries: Mapping[str, Iterable[str]]) -> None:
        """Engine's holdings from a snapshot: tier kind -> keys (what was there is dropped)."""
        self.drop(engine)
        self.resyncs[engine] = self.resyncs.get(engine, 0) + 1
        for kind, keys in entries.items():
            self._add(engine, kind, keys)

    def apply(self, engine: str, kind: str, event: Mapping[str, Any]) -> None:
        """One feed event of ``engine`` for its tier of ``kind``."""
        keys = event.get("keys", ())
        if event.get("kind") == "stored":
            self._add(engine, kind, keys)
            predicted = self._predicted.get(engine)
            if predicted:
                for key in keys:
                    predicted.pop(key, None)
        else:  # evicted, removed
            for key in keys:
                holders = self._where.get(key)
                if holders is None or engine not in holders:
                    continue
                holders[engine].discard(kind)
                if not holders[engine]:
                    del holders[engine]
                    if not holders:
                        del self._where[key]
        if "t" in event:
            self.staleness.add(time.time() - float(event["t"]))

    def drop(self, engine: str) -> None:
        """Forget everything ``engine`` held (it restarted, or left)."""
        for key in [k for k, h in self._where.items() if engine in h]:
            holders = self._where[key]
            del holders[engine]
            if not holders:
                del self._where[key]
        self._predicted.pop(engine, None)

    def drop_kind(self, engine: str, kind: str) -> None:
        """Forget what ``engine`` held in its tier of ``kind`` (its events were lost)."""
        for key in [k for k, h in self._where.items() if kind in h.get(engine, ())]:
            holders = self._where[key]
            holders[engine].discard(kind)
            if not holders[engine]:
                del holders[engine]
                if not holders:
                    del self._where[key]

    def predict(self, engine: str, keys: Iterable[str], now: float | None = None) -> None:
        """``keys`` will be on ``engine`` once the request routed there is computed."""
        expiry = (now if now is not None else time.monotonic()) + PREDICTED_S
        self._predicted.setdefault(engine, {}).update(dict.fromkeys(keys, expiry))

    def kinds(self, engine: str, keys: Sequence[str], now: float | None = None) -> list[set[str]]:
        """For each key, the tier kinds ``engine`` holds it in ("predicted" for a
        prediction), up to the first it does not hold."""
        clock = now if now is not None else time.monotonic()
        predicted = self._predicted.get(engine, {})
        out: list[set[str]] = []
        for key in keys:
            kinds = set(self._where.get(key, {}).get(engine, ()))
            expiry = predicted.get(key)
            if expiry is not None:
                if expiry > clock:
                    kinds.add("predicted")
                else:
                    del predicted[key]
            if not kinds:
                break
            out.append(kinds)
        return out

    def _add(self, engine: str, kind: str, keys: Iterable[str]) -> None:
        for key in keys:
            self._where.setdefault(key, {}).setdefault(engine, set()).add(kind)

    def holders(self, key: str) -> dict[str, list[str]]:
        """The engines that hold ``key`` (hex), and in which tier kinds."""
        return {engine: sorted(kinds) for engine, kinds in self._where.get(key, {}).items()}

    def counts(self) -> dict[str, dict[str, int]]:
        """Chunks per engine and tier kind."""
        out: dict[str, dict[str, int]] = {}
        for holders in self._where.values():
            for engine, kinds in holders.items():
                for kind in kinds:
                    per = out.setdefault(engine, {})
                    per[kind] = per.get(kind, 0) + 1
        return out
