"""Loading chunks straight into the caller's buffers (:meth:`kvtier.store.TieredStore.get_into`),
and the pieces of the read path it shares with :mod:`kvtier.reads`: walking the tiers for a
run of chunks, verifying a chunk into a buffer, promoting what was read."""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Sequence
from typing import Any

from kvtier import codec, inflate
from kvtier.codec import Compression, KVChunk
from kvtier.errors import CorruptChunk
from kvtier.hierarchy import Hierarchy, Slot
from kvtier.keys import ChunkKey, Namespace
from kvtier.results import LoadResult
from kvtier.tiers.base import Blob
from kvtier.writes import Writes

log = logging.getLogger("kvtier")


class ReadInto:
    """get_into over the hierarchy ``h``; promotions go through ``writes``."""

    def __init__(self, h: Hierarchy, writes: Writes):
        self.h = h
        self.writes = writes

    def get_into(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        dests: Sequence[Any],
        start_chunk: int = 0,
        tail: bool = False,
    ) -> LoadResult:
        """Load chunks ``start_chunk``, ``start_chunk + 1``... straight into ``dests``; with
        ``tail``, the last one is the trailing partial chunk of ``tokens``.

        ``dests[j]`` is a writable, C-contiguous buffer (bytearray, numpy array, a pinned host
        tensor's numpy view) of exactly the chunk's payload size (a tail's is smaller). Disk
        reads land there with no intermediate copy. Returns how many leading chunks were
        loaded and verified; the contents of later buffers are unspecified. Never raises for a
        tier failure.
        """
        views = [memoryview(d).cast("B") for d in dests]
        if any(v.readonly for v in views):
            raise ValueError("get_into needs writable destination buffers")
        keys = self.writes.keys(tokens, namespace, tail)[start_chunk : start_chunk + len(views)]
        headers = [bytearray(codec.HEADER_BYTES) for _ in keys]
        self.h.prefetcher.wait_for(keys)
        with self.h.pinned(keys):
            run = walk(self.h, keys, lambda slot, idx: self._load(slot, keys, idx, headers, views))
        promote(
            self.h,
            self.writes,
            [
                (keys[i], None, t, codec.join(headers[i], views[i], self._blank_for(views[i])))
                for i, t in enumerate(run)
                if t
            ],
        )
        return LoadResult(len(run), [self.h.slots[t].tier.name for t in run], self.h.chunk_tokens)

    def _blank_for(self, payload: memoryview) -> codec.SealedChunk | None:
        return self.h.blanks(codec.HEADER_BYTES + payload.nbytes)

    def _load(
        self,
        slot: Slot,
        keys: Sequence[ChunkKey],
        idx: Sequence[int],
        headers: Sequence[bytearray],
        views: Sequence[memoryview],
    ) -> list[bool]:
        """Load chunks ``idx`` from one tier into their buffers; whether each one verified."""
        if slot.tier.zero_copy_reads:
            blobs = self.h.guard(
                slot, [None] * len(idx), slot.tier.get_many, [keys[i] for i in idx]
            )
            return [
                copy_verified(self.h, slot, keys[i], blob, headers[i], views[i])
                for i, blob in zip(idx, blobs, strict=True)
            ]
        items = [(keys[i], [memoryview(headers[i]), views[i]]) for i in idx]
        sizes = self.h.guard(slot, [None] * len(idx), slot.tier.read_into_many, items)
        return [
            self._check_loaded(slot, keys[i], headers[i], views[i], size)
            for i, size in zip(idx, sizes, strict=True)
        ]

    def _check_loaded(
        self, slot: Slot, key: ChunkKey, header: bytearray, dest: memoryview, size: int | None
    ) -> bool:
        """Verify a chunk that read_into_many put in (header, dest); fall back to a full read
        when the stored form did not fit the buffer (compressed, or another shape)."""
        if size is None:
            self.h.recorder.add(slot.tier.name, misses=1)
            return False
        if codec.HEADER_BYTES < size < codec.HEADER_BYTES + dest.nbytes and slot.tier.fills_front:
            # stored smaller than its raw form, read into the front of (header, dest): decode
            # it into dest from a copy of the stored payload, without reading it again
            stored = bytearray(size)
            stored[: codec.HEADER_BYTES] = header
            stored[codec.HEADER_BYTES :] = dest[: size - codec.HEADER_BYTES]
            return copy_verified(self.h, slot, key, stored, header, dest)
        if size == codec.HEADER_BYTES + dest.nbytes:
            try:
                h = codec.verify(header, dest, expected_key=key)
            except CorruptChunk as exc:
                self.h.corrupt(slot, key, exc)
                return False
            if h.compression == Compression.NONE:
                self.h.recorder.add(slot.tier.name, hits=1, bytes_read=size)
                return True
        blob = self.h.guard(slot, [None], slot.tier.get_many, [key])[0]
        return copy_verified(self.h, slot, key, blob, header, dest)


def walk(
    h: Hierarchy, keys: Sequence[ChunkKey], read_from: Callable[[Slot, list[int]], list[bool]]
) -> list[int]:
    """Read the leading run of ``keys``, each from the first tier holding it.

    ``read_from(slot, idx)`` reads chunks ``idx`` from one tier and says which verified; a
    chunk that did not (a corrupt DRAM copy, say) is tried again from a lower tier holding
    it. Returns the tier index of each chunk of the longest verified leading run.
    """
    loaded: dict[int, int] = {}
    pending = dict(enumerate(h.leading(keys)))  # chunk index -> tier to read it from
    while pending:
        by_tier: dict[int, list[int]] = {}
        for i, t in pending.items():
            by_tier.setdefault(t, []).append(i)
        pending = {}
        for t, idx in by_tier.items():
            for i, ok in zip(idx, read_from(h.slots[t], idx), strict=True):
                if ok:
                    loaded[i] = t
                elif (lower := h.find_below(keys[i], t)) is not None:
                    pending[i] = lower
    run: list[int] = []
    while len(run) in loaded:
        run.append(loaded[len(run)])
    return run


def copy_verified(
    h: Hierarchy,
    slot: Slot,
    key: ChunkKey,
    blob: Any,
    header: bytearray,
    dest: memoryview,
    seal_into: codec.SealedChunk | None = None,
) -> bool:
    if blob is None:
        h.recorder.add(slot.tier.name, misses=1)
        return False
    size = memoryview(blob).nbytes  # before seal_into's header replaces the stored one
    try:
        inflate.decode_into(blob, dest, expected_key=key, seal_into=seal_into)
    except CorruptChunk as exc:
        h.corrupt(slot, key, exc)
        return False
    except ValueError as exc:
        log.warning(
            "kvtier: chunk %s in tier %r does not fit the buffer (%s): is the namespace"
            " missing something that changes the KV shape?",
            key.hex(),
            slot.tier.name,
            exc,
        )
        h.recorder.add(slot.tier.name, misses=1)
        return False
    header[:] = memoryview(blob).cast("B")[: codec.HEADER_BYTES]
    h.recorder.add(slot.tier.name, hits=1, bytes_read=size)
    return True


def promote(
    h: Hierarchy,
    writes: Writes,
    found: Sequence[tuple[ChunkKey, KVChunk | None, int, Blob]],
    as_stored: Container[ChunkKey] = (),
) -> None:
    """Copy chunks read from tier t into tiers 0..t-1 (tier 0 inline, others queued), each in
    the tier's stored form; into tier 0, the chunks of ``as_stored`` as they are (int4r and
    int8 chunks a load decodes into place: lossy already, and 3.4x and 1.9x smaller than
    raw)."""
    for upper in range(len(h.slots)):
        items = [(k, blob) for k, _, t, blob in found if t > upper]
        if not items:
            continue
        if upper == 0:
            kept = [(k, b) for k, b in items if k in as_stored]
            writes.write_to(h.slots[0], [(k, b) for k, b in items if k not in as_stored])
            writes.write_to(h.slots[0], kept, as_stored=True)
        else:
            writes.enqueue(h.slots[upper], items)
