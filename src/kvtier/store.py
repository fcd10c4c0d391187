"""TieredStore: the ordered hierarchy of tiers behind one lookup / get / put API.

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

import logging
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import takewhile
from typing import Any, TypeVar, cast

from kvtier import codec
from kvtier.codec import Compression, KVChunk
from kvtier.errors import CorruptChunk
from kvtier.health import TierHealth
from kvtier.keys import ChunkKey, Namespace, chunk_keys
from kvtier.prefetch import Prefetcher
from kvtier.results import GetResult, LoadResult, LookupResult, PutReport
from kvtier.stats import ChunkEvent, Recorder, StoreStats
from kvtier.tiers.base import Blob, Tier
from kvtier.writeback import WriteBatch, WriteBehind

log = logging.getLogger("kvtier")
T = TypeVar("T")


@dataclass
class _Slot:
    tier: Tier
    compression: Compression
    health: TierHealth
    writer: WriteBehind | None = None


class TieredStore:
    """Tiers in order, fastest first. The store owns them and closes them on :meth:`close`."""

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
        self._recorder = Recorder(names)
        self._slots = [
            _Slot(t, c, TierHealth(t.name, retry_after_s))
            for t, c in zip(tiers, comps, strict=True)
        ]
        for slot in self._slots[1:]:
            slot.writer = WriteBehind(slot.tier.name, self._writer_for(slot), write_queue)
        self._prefetcher = Prefetcher()

    @property
    def tiers(self) -> list[Tier]:
        return [s.tier for s in self._slots]

    # -- failure containment ---------------------------------------------------------------

    def _guard(self, slot: _Slot, default: Any, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, or ``default`` if the tier is marked down or the call fails."""
        if not slot.health.available():
            return cast(T, default)
        try:
            result = call(*args)
        except Exception as exc:
            self._recorder.add(slot.tier.name, errors=1)
            slot.health.failed(exc)
            return cast(T, default)
        slot.health.succeeded()
        return result

    # -- read path -------------------------------------------------------------------------

    def keys(self, tokens: Sequence[int] | Any, namespace: Namespace) -> list[ChunkKey]:
        return chunk_keys(tokens, namespace, self.chunk_tokens)

    def _where(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Index of the first tier holding each key, None where no tier does."""
        where: list[int | None] = [None] * len(keys)
        for t, slot in enumerate(self._slots):
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            present = self._guard(
                slot, [False] * len(todo), slot.tier.contains_many, [keys[i] for i in todo]
            )
            missing = 0
            for i, p in zip(todo, present, strict=True):
                if p:
                    where[i] = t
                else:
                    missing += 1
            self._recorder.add(slot.tier.name, misses=missing)
        return where

    def locate(self, keys: Sequence[ChunkKey]) -> list[str | None]:
        """Name of the first tier holding each key (None where none does), all keys checked.

        For callers that combine kvtier with what they know from elsewhere (a connector's
        mirror of another process's DRAM tier); :meth:`lookup` is the usual entry point.
        """
        return [None if t is None else self._slots[t].tier.name for t in self._where(keys)]

    def _locate(self, keys: Sequence[ChunkKey]) -> list[int]:
        """Index of the first tier holding each leading key, up to the first key none holds."""
        return [t for t in takewhile(lambda t: t is not None, self._where(keys)) if t is not None]

    def lookup(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        held_elsewhere: Container[bytes] = frozenset(),
    ) -> LookupResult:
        """How many leading tokens are cached, and where. Never raises for a tier failure.

        ``held_elsewhere`` lists keys the caller knows another process holds (a vLLM
        worker's DRAM tier, mirrored from its events); they count as hits in tier
        ``"elsewhere"``.
        """
        keys = self.keys(tokens, namespace)
        if held_elsewhere:
            names: list[str] = []
            for key, tier in zip(keys, self.locate(keys), strict=True):
                if tier is None and key not in held_elsewhere:
                    break
                names.append(tier or "elsewhere")
        else:
            names = [self._slots[t].tier.name for t in self._locate(keys)]
        self._recorder.lookup(len(tokens), len(names) * self.chunk_tokens)
        return LookupResult(keys, names, self.chunk_tokens)

    def get(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        start_chunk: int = 0,
        max_chunks: int | None = None,
    ) -> GetResult:
        """Verified chunks from ``start_chunk`` on, as many consecutive ones as are available.

        Chunks found below the top tier are promoted to the tiers above in the background.
        """
        keys = self.keys(tokens, namespace)[start_chunk:]
        if max_chunks is not None:
            keys = keys[:max_chunks]
        self._prefetcher.wait_for(keys)
        with self.pinned(keys):
            found = self._fetch(keys)
        self._promote(found)
        chunks = [f[1] for f in found]
        names = [self._slots[f[2]].tier.name for f in found]
        return GetResult(chunks, names, self.chunk_tokens)

    def _walk(
        self, keys: Sequence[ChunkKey], read_from: Callable[[_Slot, list[int]], list[bool]]
    ) -> list[int]:
        """Read the leading run of ``keys``, each from the first tier holding it.

        ``read_from(slot, idx)`` reads chunks ``idx`` from one tier and says which verified; a
        chunk that did not (a corrupt DRAM copy, say) is tried again from a lower tier holding
        it. Returns the tier index of each chunk of the longest verified leading run.
        """
        loaded: dict[int, int] = {}
        pending = dict(enumerate(self._locate(keys)))  # chunk index -> tier to read it from
        while pending:
            by_tier: dict[int, list[int]] = {}
            for i, t in pending.items():
                by_tier.setdefault(t, []).append(i)
            pending = {}
            for t, idx in by_tier.items():
                for i, ok in zip(idx, read_from(self._slots[t], idx), strict=True):
                    if ok:
                        loaded[i] = t
                    elif (lower := self._find_below(keys[i], t)) is not None:
                        pending[i] = lower
        run: list[int] = []
        while len(run) in loaded:
            run.append(loaded[len(run)])
        return run

    def _fetch(self, keys: Sequence[ChunkKey]) -> list[tuple[ChunkKey, KVChunk, int, Blob]]:
        """(key, chunk, tier index, stored bytes) for the longest verified leading run."""
        got: dict[int, tuple[KVChunk, Blob]] = {}

        def read_from(slot: _Slot, idx: list[int]) -> list[bool]:
            blobs = self._guard(slot, [None] * len(idx), slot.tier.get_many, [keys[i] for i in idx])
            for i, blob in zip(idx, blobs, strict=True):
                chunk = self._verify(slot, keys[i], blob)
                if chunk is not None and blob is not None:
                    got[i] = (chunk, blob)
            return [i in got for i in idx]

        run = self._walk(keys, read_from)
        return [(keys[i], got[i][0], t, got[i][1]) for i, t in enumerate(run)]

    def _verify(self, slot: _Slot, key: ChunkKey, blob: Any) -> KVChunk | None:
        if blob is None:
            self._recorder.add(slot.tier.name, misses=1)
            return None
        try:
            chunk = codec.decode(blob, expected_key=key).chunk
        except CorruptChunk as exc:
            self._corrupt(slot, key, exc)
            return None
        self._recorder.add(slot.tier.name, hits=1, bytes_read=len(blob))
        return chunk

    def _corrupt(self, slot: _Slot, key: ChunkKey, exc: CorruptChunk) -> None:
        log.warning(
            "kvtier: corrupt chunk %s in tier %r removed: %s", key.hex(), slot.tier.name, exc
        )
        self._recorder.add(slot.tier.name, corruptions=1)
        self._guard(slot, False, slot.tier.delete, key)
        self._recorder.emit("removed", slot.tier.name, [key])

    def get_into(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        dests: Sequence[Any],
        start_chunk: int = 0,
    ) -> LoadResult:
        """Load chunks ``start_chunk``, ``start_chunk + 1``... straight into ``dests``.

        ``dests[j]`` is a writable, C-contiguous buffer (bytearray, numpy array, a pinned host
        tensor's numpy view) of exactly the chunk's payload size. Disk reads land there with
        no intermediate copy. Returns how many leading chunks were loaded and verified; the
        contents of later buffers are unspecified. Never raises for a tier failure.
        """
        views = [memoryview(d).cast("B") for d in dests]
        if any(v.readonly for v in views):
            raise ValueError("get_into needs writable destination buffers")
        keys = self.keys(tokens, namespace)[start_chunk : start_chunk + len(views)]
        headers = [bytearray(codec.HEADER_BYTES) for _ in keys]
        self._prefetcher.wait_for(keys)
        with self.pinned(keys):
            run = self._walk(keys, lambda slot, idx: self._load(slot, keys, idx, headers, views))
        self._promote(
            [(keys[i], None, t, codec.join(headers[i], views[i])) for i, t in enumerate(run) if t]
        )
        return LoadResult(len(run), [self._slots[t].tier.name for t in run], self.chunk_tokens)

    def _load(
        self,
        slot: _Slot,
        keys: Sequence[ChunkKey],
        idx: Sequence[int],
        headers: Sequence[bytearray],
        views: Sequence[memoryview],
    ) -> list[bool]:
        """Load chunks ``idx`` from one tier into their buffers; whether each one verified."""
        if slot.tier.zero_copy_reads:
            blobs = self._guard(slot, [None] * len(idx), slot.tier.get_many, [keys[i] for i in idx])
            return [
                self._copy_verified(slot, keys[i], blob, headers[i], views[i])
                for i, blob in zip(idx, blobs, strict=True)
            ]
        items = [(keys[i], [memoryview(headers[i]), views[i]]) for i in idx]
        sizes = self._guard(slot, [None] * len(idx), slot.tier.read_into_many, items)
        return [
            self._check_loaded(slot, keys[i], headers[i], views[i], size)
            for i, size in zip(idx, sizes, strict=True)
        ]

    def _copy_verified(
        self, slot: _Slot, key: ChunkKey, blob: Any, header: bytearray, dest: memoryview
    ) -> bool:
        if blob is None:
            self._recorder.add(slot.tier.name, misses=1)
            return False
        try:
            codec.decode_into(blob, dest, expected_key=key)
        except CorruptChunk as exc:
            self._corrupt(slot, key, exc)
            return False
        except ValueError as exc:
            log.warning(
                "kvtier: chunk %s in tier %r does not fit the buffer (%s): is the namespace"
                " missing something that changes the KV shape?",
                key.hex(),
                slot.tier.name,
                exc,
            )
            self._recorder.add(slot.tier.name, misses=1)
            return False
        header[:] = memoryview(blob).cast("B")[: codec.HEADER_BYTES]
        self._recorder.add(slot.tier.name, hits=1, bytes_read=memoryview(blob).nbytes)
        return True

    def _check_loaded(
        self, slot: _Slot, key: ChunkKey, header: bytearray, dest: memoryview, size: int | None
    ) -> bool:
        """Verify a chunk that read_into_many put in (header, dest); fall back to a full read
        when the stored form did not fit the buffer (compressed, or another shape)."""
        if size is None:
            self._recorder.add(slot.tier.name, misses=1)
            return False
        if size == codec.HEADER_BYTES + dest.nbytes:
            try:
                h = codec.verify(header, dest, expected_key=key)
            except CorruptChunk as exc:
                self._corrupt(slot, key, exc)
                return False
            if h.compression == Compression.NONE:
                self._recorder.add(slot.tier.name, hits=1, bytes_read=size)
                return True
        blob = self._guard(slot, [None], slot.tier.get_many, [key])[0]
        return self._copy_verified(slot, key, blob, header, dest)

    def _find_below(self, key: ChunkKey, tier_index: int) -> int | None:
        for t in range(tier_index + 1, len(self._slots)):
            slot = self._slots[t]
            if self._guard(slot, [False], slot.tier.contains_many, [key])[0]:
                return t
        return None

    def _promote(self, found: Sequence[tuple[ChunkKey, KVChunk | None, int, Blob]]) -> None:
        """Copy chunks read from tier t into tiers 0..t-1 (tier 0 inline, others queued)."""
        for upper in range(len(self._slots)):
            items = [(k, blob) for k, _, t, blob in found if t > upper]
            if not items:
                continue
            if upper == 0:
                self._write_to(self._slots[0], items)
            else:
                self._enqueue(self._slots[upper], items)

    def prefetch(self, tokens: Sequence[int] | Any, namespace: Namespace) -> Future[int]:
        """Promote the cached prefix of ``tokens`` toward the top tier in the background.

        The future gives the number of leading tokens the prefetch found; it never raises for
        a tier failure.
        """
        keys = self.keys(tokens, namespace)

        def run() -> int:
            with self.pinned(keys):
                where = self._locate(keys)
                below = [keys[i] for i, t in enumerate(where) if t > 0]
                if below:
                    self._promote(self._fetch(below))
            return len(where) * self.chunk_tokens

        return self._prefetcher.submit(keys, run)

    # -- write path ------------------------------------------------------------------------

    def put(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        chunks: Sequence[KVChunk],
        start_chunk: int = 0,
    ) -> PutReport:
        """Store ``chunks[j]`` as chunk ``start_chunk + j`` of ``tokens``.

        Writes the top tier inline, queues copies for lower tiers, and returns without waiting
        for them. Never raises for a tier failure; raises ValueError for bad arguments.
        """
        keys = self.keys(tokens, namespace)[start_chunk : start_chunk + len(chunks)]
        if len(keys) < len(chunks):
            raise ValueError(
                f"{len(chunks)} chunks from chunk {start_chunk} need"
                f" {(start_chunk + len(chunks)) * self.chunk_tokens} tokens, got {len(tokens)}"
            )
        for j, chunk in enumerate(chunks):
            if chunk.tokens != self.chunk_tokens:
                raise ValueError(
                    f"chunk {start_chunk + j} holds {chunk.tokens} tokens, the store's chunks"
                    f" are {self.chunk_tokens}"
                )
        top = self._slots[0]
        held = self._guard(top, [False] * len(keys), top.tier.contains_many, keys)
        ns_id = namespace.id(self.chunk_tokens)
        items: WriteBatch = [
            (key, codec.encode(key, chunk, ns_id, top.compression))
            for key, chunk, h in zip(keys, chunks, held, strict=True)
            if not h
        ]
        self._write_to(top, items)
        dropped = sum(self._enqueue(slot, items) for slot in self._slots[1:])
        queued = len(items) * (len(self._slots) - 1) - dropped
        return PutReport(len(items), queued, dropped)

    def _enqueue(self, slot: _Slot, items: WriteBatch) -> int:
        assert slot.writer is not None
        dropped = slot.writer.submit(items)
        if dropped:
            self._recorder.add(slot.tier.name, writes_dropped=dropped)
        return dropped

    def _writer_for(self, slot: _Slot) -> Callable[[WriteBatch], None]:
        return lambda batch: self._write_to(slot, batch, skip_held=True)

    def _write_to(self, slot: _Slot, items: WriteBatch, skip_held: bool = False) -> None:
        if not items:
            return
        name = slot.tier.name
        if not slot.health.available():
            self._recorder.add(name, writes_dropped=len(items))
            return
        if skip_held:  # write-behind: don't rewrite what the tier has (saves SSD writes)
            held = self._guard(slot, None, slot.tier.contains_many, [k for k, _ in items])
            if held is None:
                self._recorder.add(name, writes_dropped=len(items))
                return
            items = [item for item, h in zip(items, held, strict=True) if not h]
        items = [(k, codec.recode(blob, slot.compression)) for k, blob in items]
        result = self._guard(slot, None, slot.tier.put_many, items)
        if result is None:
            self._recorder.add(name, writes_dropped=len(items))
            return
        written = [(k, b) for (k, b), ok in zip(items, result.stored, strict=True) if ok]
        unwritten = len(items) - len(written)
        if result.error is not None:  # failed part-way: what it did still counts
            self._recorder.add(name, errors=1)
            slot.health.failed(result.error)
        self._recorder.add(
            name,
            chunks_written=len(written),
            bytes_written=sum(memoryview(b).nbytes for _, b in written),
            writes_rejected=0 if result.error else unwritten,
            writes_dropped=unwritten if result.error else 0,
            evictions=len(result.evicted),
        )
        self._recorder.emit("stored", name, [k for k, _ in written])
        self._recorder.emit("evicted", name, result.evicted)

    # -- pins, stats, lifecycle ------------------------------------------------------------

    @contextmanager
    def pinned(self, keys: Sequence[ChunkKey]) -> Iterator[None]:
        """Keep ``keys`` from being evicted by this process while the block runs."""
        for slot in self._slots:
            slot.tier.pin(keys)
        try:
            yield
        finally:
            for slot in self._slots:
                slot.tier.unpin(keys)

    def subscribe(self, listener: Callable[[ChunkEvent], None]) -> None:
        """Call ``listener`` for every stored / evicted / removed event.

        Listeners run on whichever thread caused the event (a caller's, a write-behind
        worker, the prefetcher) and must return quickly; they must not wait on the store.
        """
        self._recorder.subscribe(listener)

    def stats(self) -> StoreStats:
        return self._recorder.snapshot()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued lower-tier writes are done. False if ``timeout`` ran out."""
        return all(s.writer.flush(timeout) for s in self._slots[1:] if s.writer is not None)

    def close(self) -> None:
        """Finish queued writes (bounded wait), stop workers, close tiers."""
        self._prefetcher.shutdown()
        for slot in self._slots:
            if slot.writer is not None:
                slot.writer.close()
            try:
                slot.tier.close()
            except Exception as exc:  # closing a dead connection is not worth a crash
                log.warning("kvtier: closing tier %r failed: %s", slot.tier.name, exc)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
