"""Counters and events: what the store did, per tier, for metrics and for the router."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from kvtier.keys import ChunkKey

log = logging.getLogger("kvtier")


@dataclass
class TierStats:
    hits: int = 0  # chunks read from this tier and verified
    misses: int = 0  # chunks looked for here and absent
    bytes_read: int = 0
    read_seconds: float = 0.0  # time spent in sized batch reads (the loads' path): bandwidth
    bytes_written: int = 0
    chunks_written: int = 0
    tokens_written: int = 0  # the logical tokens of the chunks written
    raw_bytes_written: int = 0  # their KV in the engine's dtype: / bytes_written, the codec's
    evictions: int = 0
    corruptions: int = 0  # chunks that failed verification (then deleted here)
    errors: int = 0  # failed calls (tier down, disk full, permission...)
    writes_dropped: int = 0  # write-through queue full, or tier down: write skipped
    writes_rejected: int = 0  # the tier had no room (everything left was pinned)
    writes_existing: int = 0  # not sent: another writer had stored it (a conditional upload)


@dataclass
class StoreStats:
    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    tiers: dict[str, TierStats] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


EventKind = Literal["stored", "evicted", "removed"]


@dataclass(frozen=True)
class ChunkEvent:
    """Chunks that appeared in ("stored") or left ("evicted", "removed" as corrupt) a tier."""

    kind: EventKind
    tier: str
    keys: tuple[ChunkKey, ...]


Listener = Callable[[ChunkEvent], None]


class Recorder:
    """Thread-safe counters plus event fan-out; one per store."""

    def __init__(self, tier_names: Sequence[str]):
        self._lock = threading.Lock()
        self._stats = StoreStats(tiers={name: TierStats() for name in tier_names})
        self._listeners: list[Listener] = []

    def add(self, tier: str, **counts: float) -> None:
        with self._lock:
            stats = self._stats.tiers[tier]
            for name, n in counts.items():
                setattr(stats, name, getattr(stats, name) + n)

    def lookup(self, tokens: int, hit_tokens: int) -> None:
        with self._lock:
            self._stats.lookups += 1
            self._stats.lookup_tokens += tokens
            self._stats.hit_tokens += hit_tokens

    def snapshot(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                self._stats.lookups,
                self._stats.lookup_tokens,
                self._stats.hit_tokens,
                {name: TierStats(**asdict(s)) for name, s in self._stats.tiers.items()},
            )

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, kind: EventKind, tier: str, keys: Sequence[ChunkKey]) -> None:
        if not keys:
            return
        event = ChunkEvent(kind, tier, tuple(keys))
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not break the data path
                log.exception("kvtier event listener failed on %s", kind)
