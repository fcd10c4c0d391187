"""TieredStore: the ordered hierarchy of tiers behind one lookup / get / put API, made of
three parts: :class:`~kvtier.hierarchy.Hierarchy` (the tiers, failure containment, where each
chunk is, pins, events), :class:`~kvtier.writes.Writes` (keys, put, write-behind) and
:class:`~kvtier.reads.Reads` (get, verification, promotion, prefetch), get_into in
:class:`~kvtier.read_into.ReadInto`.

Data path::

    put ──encode──▶ tier 0 (inline) ──write-behind queues──▶ tier 1, tier 2 ...
    get ◀─verify── first tier holding each chunk ──promote (async)──▶ the tiers above it

Invariants:
- A chunk is returned only after its checksum and key verified; a chunk that fails is deleted
  from the tier that held it, counted, reported as a "removed" event, and treated as a miss.
- Tier failures never reach the caller of lookup/get/prefetch/put: they become misses or
  skipped writes (see :mod:`kvtier.health`), and the store keeps using the healthy tiers.
- Keys being read are pinned in every tier for the duration, so they are not evicted
  mid-read; callers that look up now and load later hold their own pins (:meth:`pinned`).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, suppress
from typing import Any

from kvtier import codec
from kvtier.codec import Compression, KVChunk
from kvtier.hierarchy import Hierarchy
from kvtier.keys import ChunkKey, Namespace
from kvtier.lookup import Lookups
from kvtier.owners import Owners
from kvtier.read_into import ReadInto
from kvtier.reads import Reads
from kvtier.results import GetResult, LoadResult, LookupResult, OnRead, PutReport
from kvtier.stats import ChunkEvent, StoreStats
from kvtier.tiers.base import Tier
from kvtier.writes import Writes


class TieredStore:
    """Tiers in order, fastest first (the store owns them and closes them on :meth:`close`)."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        chunk_tokens: int = 256,
        compression: Sequence[Compression] | None = None,
        write_queue: int = 64,
        retry_after_s: float = 1.0,
        owners: Owners | None = None,
    ):
        self._h = Hierarchy(tiers, chunk_tokens, compression, write_queue, retry_after_s)
        self._writes = Writes(self._h, owners)
        self._reads = Reads(self._h, self._writes)
        self._lookups = Lookups(self._h, self._writes)
        self.chunk_tokens = chunk_tokens

    # -- keys and writes (kvtier.writes) ---------------------------------------------------

    def keys(
        self, tokens: Sequence[int] | Any, namespace: Namespace, tail: bool = False
    ) -> list[ChunkKey]:
        return self._writes.keys(tokens, namespace, tail)

    def put(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        chunks: Sequence[KVChunk],
        start_chunk: int = 0,
        tail: bool = False,
    ) -> PutReport:
        return self._writes.put(tokens, namespace, chunks, start_chunk, tail)

    def put_encoded(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        blobs: Sequence[codec.SealedChunk],
        start_chunk: int = 0,
        tail: bool = False,
        through: bool = False,
    ) -> PutReport:
        return self._writes.put_encoded(tokens, namespace, blobs, start_chunk, tail, through)

    # -- reads (kvtier.reads) --------------------------------------------------------------

    def lookup(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        held_elsewhere: Container[bytes] = frozenset(),
        granule: int | None = None,
    ) -> LookupResult:
        return self._lookups.lookup(tokens, namespace, held_elsewhere, granule)

    def get(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        start_chunk: int = 0,
        max_chunks: int | None = None,
        tail: bool = False,
        payload_bytes: Sequence[int] | None = None,
        check_payload: bool = True,
        stored_forms: bool = False,
        on_read: OnRead | None = None,
    ) -> GetResult:
        return self._reads.get(
            tokens,
            namespace,
            start_chunk,
            max_chunks,
            tail,
            payload_bytes,
            check_payload,
            stored_forms,
            on_read,
        )

    def corrupt(self, tier: str, key: ChunkKey, reason: str) -> None:
        self._reads.corrupt(tier, key, reason)

    def get_into(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        dests: Sequence[Any],
        start_chunk: int = 0,
        tail: bool = False,
    ) -> LoadResult:
        return self._reads.into.get_into(tokens, namespace, dests, start_chunk, tail)

    def prefetch(
        self, tokens: Sequence[int] | Any, namespace: Namespace, payload_bytes: int | None = None
    ) -> Future[int]:
        return self._reads.prefetch(tokens, namespace, payload_bytes)

    # -- the tiers (kvtier.hierarchy) ------------------------------------------------------

    @property
    def tiers(self) -> list[Tier]:
        return self._h.tiers

    def locate(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        return self._h.locate(keys)

    def pinned(self, keys: Sequence[ChunkKey]) -> AbstractContextManager[None]:
        return self._h.pinned(keys)

    def use_blanks(self, source: Callable[[int], codec.SealedChunk | None]) -> None:
        self._h.use_blanks(source)

    def warm(self) -> None:
        """Set up each tier's read path now (a disk tier's reader threads and buffers), as a
        server starts, rather than in its first hit."""
        for tier in self._h.tiers:
            if (warm := getattr(tier, "warm", None)) is not None:
                with suppress(Exception):  # a tier that cannot warm reads as it would have
                    warm()

    def warm_thread(self) -> None:
        """Set up the calling thread's read state in each tier now (a disk tier's O_DIRECT
        buffer): for a caller's reader threads, which read lower tiers themselves
        (:class:`kvtier.results.OnRead`)."""
        for tier in self._h.tiers:
            if (warm := getattr(tier, "warm_thread", None)) is not None:
                with suppress(Exception):
                    warm()

    def tier_states(self) -> dict[str, dict[str, int | None]]:
        return self._h.tier_states()

    def owner_states(self) -> dict[str, dict[str, dict[str, int]]]:
        return self._h.owner_states()

    def subscribe(self, listener: Callable[[ChunkEvent], None]) -> None:
        self._h.subscribe(listener)

    def stats(self) -> StoreStats:
        return self._h.stats()

    def flush(self, timeout: float | None = None) -> bool:
        return self._h.flush(timeout)

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PARTS = (
    (Writes, ("keys", "put", "put_encoded")),
    (Lookups, ("lookup",)),
    (Reads, ("get", "prefetch", "corrupt")),
    (ReadInto, ("get_into",)),
    (
        Hierarchy,
        (
            "locate",
            "pinned",
            "use_blanks",
            "tier_states",
            "owner_states",
            "subscribe",
            "stats",
            "flush",
            "close",
        ),
    ),
)
for _part, _names in _PARTS:  # each operation's docstring is its implementation's
    for _name in _names:
        getattr(TieredStore, _name).__doc__ = getattr(_part, _name).__doc__
