"""The ordered tiers under a :class:`~kvtier.store.TieredStore`: failure containment,
where each chunk is, pins, events and lifecycle. The read path (:mod:`kvtier.reads`) and the
write path (:mod:`kvtier.writes`) work on it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import takewhile
from typing import Any, TypeVar, cast

from kvtier.codec import Compression, SealedChunk
from kvtier.errors import CorruptChunk
from kvtier.health import TierHealth
from kvtier.keys import ChunkKey
from kvtier.owners import NO_TENANT
from kvtier.prefetch import Prefetcher
from kvtier.stats import ChunkEvent, Recorder, StoreStats
from kvtier.tiers.base import Tier
from kvtier.writeback import WriteBatch, WriteBehind

log = logging.getLogger("kvtier")
T = TypeVar("T")


@dataclass
class Slot:
    tier: Tier
    compression: Compression
    health: TierHealth
    writer: WriteBehind | None = None


class Hierarchy:
    """Tiers in order, fastest first. Owns them and closes them on :meth:`close`."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        chunk_tokens: int = 256,
        compression: Sequence[Compression] | None = None,
        write_queue: int = 64,
        retry_after_s: float = 1.0,
    ):
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        comps = list(compression) if compression is not None else [Compression.NONE] * len(tiers)
        if len(comps) != len(tiers):
            raise ValueError("give one compression per tier")
        self.chunk_tokens = chunk_tokens
        self.recorder = Recorder(names)
        self.slots = [
            Slot(t, c, TierHealth(t.name, retry_after_s)) for t, c in zip(tiers, comps, strict=True)
        ]
        self.write_queue = write_queue  # batches each lower tier's write-behind holds
        self.prefetcher = Prefetcher()
        self.blanks: Callable[[int], SealedChunk | None] = lambda nbytes: None

    def use_blanks(self, source: Callable[[int], SealedChunk | None]) -> None:
        """Take the DRAM copies of chunks read from lower tiers from ``source(nbytes)`` (a
        blank of that many bytes, or None): :meth:`get_into` promotes into them, a sized
        :meth:`get` reads straight into them. Memory touched ahead of time costs a tenth of
        fresh pages here, and both are on the loading request's path."""
        self.blanks = source

    @property
    def tiers(self) -> list[Tier]:
        return [s.tier for s in self.slots]

    def tier_states(self) -> dict[str, dict[str, int | None]]:
        """Per tier: up (1, or 0 while taken out), used bytes, chunks, capacity (None when
        the tier does not bound itself), and the logical tokens it holds: its bytes at the
        tokens per stored byte of the chunks written to it since the start (None before the
        first; exact while the tier holds one codec). A tier that cannot say reports only
        ``up``."""
        out: dict[str, dict[str, int | None]] = {}
        written = self.recorder.snapshot().tiers
        for slot in self.slots:
            state: dict[str, int | None] = {"up": int(slot.health.available())}
            try:
                usage = slot.tier.usage()
                state.update(
                    used_bytes=usage.bytes, chunks=usage.chunks, capacity_bytes=usage.capacity
                )
                stats = written[slot.tier.name]
                if stats.bytes_written:
                    state["tokens"] = usage.bytes * stats.tokens_written // stats.bytes_written
            except Exception:  # a tier that is down: its health says so
                pass
            out[slot.tier.name] = state
        return out

    def owner_states(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per tenant (id, 16 hex digits), per tier that divides its room among tenants
        (quotas): bytes held, its share or quota (``quota``: 1 for a quota), evictions since
        the start; ``unknown`` for chunks whose tenant a tier cannot tell. Empty without
        tenants."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for slot in self.slots:
            try:
                parts = slot.tier.owner_usage()
            except Exception:  # a tier that is down: its health says so
                continue
            for owner, part in parts.items():
                known = isinstance(owner, bytes) and owner != NO_TENANT
                tenant = owner.hex() if isinstance(owner, bytes) and known else "unknown"
                out.setdefault(tenant, {})[slot.tier.name] = {
                    "used_bytes": part.used_bytes,
                    "share_bytes": part.share_bytes,
                    "quota": int(part.quota),
                    "evictions": part.evictions,
                }
        return out

    # -- failure containment ---------------------------------------------------------------

    def guard(self, slot: Slot, default: Any, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, or ``default`` if the tier is marked down or the call fails."""
        if not slot.health.available():
            return cast(T, default)
        try:
            result = call(*args)
        except Exception as exc:
            self.recorder.add(slot.tier.name, errors=1)
            slot.health.failed(exc)
            return cast(T, default)
        slot.health.succeeded()
        return result

    # -- read path -------------------------------------------------------------------------
    def where(self, keys: Sequence[ChunkKey], count_misses: bool = True) -> list[int | None]:
        """Index of the first tier holding each key, None where no tier does.

        ``count_misses=False`` for probes whose misses are expected (tail candidates)."""
        where: list[int | None] = [None] * len(keys)
        for t, slot in enumerate(self.slots):
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            present = self.guard(
                slot, [False] * len(todo), slot.tier.contains_many, [keys[i] for i in todo]
            )
            missing = 0
            for i, p in zip(todo, present, strict=True):
                if p:
                    where[i] = t
                else:
                    missing += 1
            if count_misses:
                self.recorder.add(slot.tier.name, misses=missing)
        return where

    def locate(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        """Name of the first tier holding each key (None where none does), all keys checked.

        For callers that combine kvtier with what they know from elsewhere (a connector's
        mirror of another process's DRAM tier); :meth:`lookup` is the usual entry point.
        """
        return [None if t is None else self.slots[t].tier.name for t in self.where(keys)]

    def leading(self, keys: Sequence[ChunkKey]) -> list[int]:
        """Index of the first tier holding each leading key, up to the first key none holds."""
        return [t for t in takewhile(lambda t: t is not None, self.where(keys)) if t is not None]

    def corrupt(self, slot: Slot, key: ChunkKey, exc: CorruptChunk) -> None:
        log.warning(
            "kvtier: corrupt chunk %s in tier %r removed: %s", key.hex(), slot.tier.name, exc
        )
        self.recorder.add(slot.tier.name, corruptions=1)
        self.guard(slot, False, slot.tier.delete, key)
        self.recorder.emit("removed", slot.tier.name, [key])

    def find_below(self, key: ChunkKey, tier_index: int) -> int | None:
        for t in range(tier_index + 1, len(self.slots)):
            slot = self.slots[t]
            if self.guard(slot, [False], slot.tier.contains_many, [key])[0]:
                return t
        return None

    def attach_writers(self, write: Callable[[Slot, WriteBatch], None]) -> None:
        """Give every tier below the top a write-behind queue whose batches ``write`` takes."""
        for slot in self.slots[1:]:
            queued = lambda batch, slot=slot: write(slot, batch)  # noqa: E731
            slot.writer = WriteBehind(slot.tier.name, queued, self.write_queue)

    # -- pins, stats, lifecycle ------------------------------------------------------------

    @contextmanager
    def pinned(self, keys: Sequence[ChunkKey]) -> Iterator[None]:
        """Keep ``keys`` from being evicted by this process while the block runs."""
        for slot in self.slots:
            slot.tier.pin(keys)
        try:
            yield
        finally:
            for slot in self.slots:
                slot.tier.unpin(keys)

    def subscribe(self, listener: Callable[[ChunkEvent], None]) -> None:
        """Call ``listener`` for every stored / evicted / removed event.

        Listeners run on whichever thread caused the event (a caller's, a write-behind
        worker, the prefetcher) and must return quickly; they must not wait on the store.
        """
        self.recorder.subscribe(listener)

    def stats(self) -> StoreStats:
        return self.recorder.snapshot()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued lower-tier writes are done. False if ``timeout`` ran out."""
        return all(s.writer.flush(timeout) for s in self.slots[1:] if s.writer is not None)

    def close(self) -> None:
        """Finish queued writes (bounded wait), stop workers, close tiers."""
        self.prefetcher.shutdown()
        for slot in self.slots:
            if slot.writer is not None:
                slot.writer.close()
            try:
                slot.tier.close()
            except Exception as exc:  # closing a dead connection is not worth a crash
                log.warning("kvtier: closing tier %r failed: %s", slot.tier.name, exc)
