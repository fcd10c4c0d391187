"""The store's write path: keys, and putting chunks into the top tier inline and into the
lower tiers through their write-behind queues (see :class:`kvtier.store.TieredStore`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvtier import codec
from kvtier.codec import KVChunk
from kvtier.hierarchy import Hierarchy, Slot
from kvtier.keys import ChunkKey, Namespace, chunk_keys, salt_tenant
from kvtier.owners import Owners
from kvtier.recode import recode
from kvtier.results import PutReport
from kvtier.writeback import WriteBatch


class Writes:
    """Chunk keys and the write path of the hierarchy ``h``; its lower tiers' write-behind
    queues write through :meth:`write_to`."""

    def __init__(self, h: Hierarchy, owners: Owners | None = None):
        self.h = h
        self.chunk_tokens = h.chunk_tokens
        # Told each namespace's tenant: whose key seals its chunks, whose quota they count in.
        self.owners = owners
        h.attach_writers(lambda slot, batch: self.write_to(slot, batch, skip_held=True))

    def keys(
        self, tokens: Sequence[int] | Any, namespace: Namespace, tail: bool = False
    ) -> list[ChunkKey]:
        """Chunk keys of ``tokens``; with ``tail``, the trailing partial chunk's key too."""
        self._noted(namespace)  # a chunk read from below keeps its owner when promoted
        return chunk_keys(tokens, namespace, self.chunk_tokens, tail=tail)

    def put(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        chunks: Sequence[KVChunk],
        start_chunk: int = 0,
        tail: bool = False,
    ) -> PutReport:
        """Store ``chunks[j]`` as chunk ``start_chunk + j`` of ``tokens``; with ``tail``, the
        last one is the trailing partial chunk of ``tokens`` (all of its tokens).

        Writes the top tier inline, queues copies for lower tiers, and returns without waiting
        for them. Never raises for a tier failure; raises ValueError for bad arguments.
        """
        sizes = [c.tokens for c in chunks]
        keys = self._put_keys(tokens, namespace, start_chunk, sizes, tail)
        top = self.h.slots[0]
        ns_id = self._noted(namespace)
        items: WriteBatch = [
            (key, codec.encode(key, chunk, ns_id, top.compression))
            for key, chunk, held in zip(keys, chunks, self._held(keys), strict=True)
            if not held
        ]
        return self._put_items(items)

    def put_encoded(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        blobs: Sequence[codec.SealedChunk],
        start_chunk: int = 0,
        tail: bool = False,
        through: bool = False,
    ) -> PutReport:
        """:meth:`put` for chunks encoded in place (:func:`kvtier.codec.blank`, filled, then
        :func:`kvtier.codec.seal`): the top tier keeps them without a copy. Each header must
        carry its chunk's key (ValueError otherwise).

        With ``through``, the lower tiers are written inline too, not queued: when this
        returns, every tier that could take the chunks holds them (a prefill engine's answer
        must not return before the shared tier has its chunks)."""
        headers = [codec.read_header(blob) for blob in blobs]
        self._noted(namespace)
        keys = self._put_keys(tokens, namespace, start_chunk, [h.tokens for h in headers], tail)
        for j, (key, header) in enumerate(zip(keys, headers, strict=True)):
            if header.key != key:
                raise ValueError(f"chunk {start_chunk + j} was encoded under another key")
        items: WriteBatch = [
            (key, blob)
            for key, blob, held in zip(keys, blobs, self._held(keys), strict=True)
            if not held
        ]
        return self._put_items(items, through)

    def _noted(self, namespace: Namespace) -> str:
        """The namespace's id, its tenant told to the owners."""
        ns_id = namespace.id(self.chunk_tokens)
        if self.owners is not None:
            self.owners.note(ns_id, salt_tenant(namespace.tenant_salt))
        return ns_id

    def _put_keys(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        start: int,
        sizes: list[int],
        tail: bool,
    ) -> list[ChunkKey]:
        full = len(tokens) // self.chunk_tokens
        want = [self.chunk_tokens] * (full - start)
        if tail and len(tokens) % self.chunk_tokens:
            want.append(len(tokens) % self.chunk_tokens)
        if len(want) < len(sizes):
            raise ValueError(
                f"{len(sizes)} chunks from chunk {start} need"
                f" {(start + len(sizes)) * self.chunk_tokens} tokens, got {len(tokens)}"
            )
        if tail and len(sizes) != len(want):
            raise ValueError(f"a tail is the last chunk: {len(want)} chunks from chunk {start}")
        for j, (size, expected) in enumerate(zip(sizes, want, strict=False)):
            if start + j == full and expected <= size <= self.chunk_tokens:
                continue  # a tail may hold slots past its tokens (a packed cache's last block)
            if size != expected:
                kind = "tail" if start + j == full else "chunk"
                raise ValueError(f"{kind} {start + j} holds {size} tokens, it must hold {expected}")
        return self.keys(tokens, namespace, tail)[start : start + len(sizes)]

    def _held(self, keys: Sequence[ChunkKey]) -> list[bool]:
        top = self.h.slots[0]
        return self.h.guard(top, [False] * len(keys), top.tier.contains_many, keys)

    def _put_items(self, items: WriteBatch, through: bool = False) -> PutReport:
        self.write_to(self.h.slots[0], items)
        if through:
            for slot in self.h.slots[1:]:
                self.write_to(slot, items, skip_held=True)
            return PutReport(len(items), len(items) * (len(self.h.slots) - 1), 0)
        dropped = sum(self.enqueue(slot, items) for slot in self.h.slots[1:])
        queued = len(items) * (len(self.h.slots) - 1) - dropped
        return PutReport(len(items), queued, dropped)

    def enqueue(self, slot: Slot, items: WriteBatch) -> int:
        assert slot.writer is not None
        dropped = slot.writer.submit(items)
        if dropped:
            self.h.recorder.add(slot.tier.name, writes_dropped=dropped)
        return dropped

    def write_to(
        self, slot: Slot, items: WriteBatch, skip_held: bool = False, as_stored: bool = False
    ) -> None:
        """Write ``items`` to ``slot``'s tier in its stored form (``as_stored``: as they are)."""
        if not items:
            return
        name = slot.tier.name
        if not slot.health.available():
            self.h.recorder.add(name, writes_dropped=len(items))
            return
        if skip_held:  # write-behind: don't rewrite what the tier has (saves SSD writes)
            held = self.h.guard(slot, None, slot.tier.contains_many, [k for k, _ in items])
            if held is None:
                self.h.recorder.add(name, writes_dropped=len(items))
                return
            items = [item for item, h in zip(items, held, strict=True) if not h]
        if not as_stored:
            items = [(k, recode(blob, slot.compression)) for k, blob in items]
        result = self.h.guard(slot, None, slot.tier.put_many, items)
        if result is None:
            self.h.recorder.add(name, writes_dropped=len(items))
            return
        written = [(k, b) for (k, b), ok in zip(items, result.stored, strict=True) if ok]
        unwritten = len(items) - len(written)
        if result.error is not None:  # failed part-way: what it did still counts
            self.h.recorder.add(name, errors=1)
            slot.health.failed(result.error)
        headers = [codec.read_header(b) for _, b in written]
        self.h.recorder.add(
            name,
            chunks_written=len(written),
            bytes_written=sum(memoryview(b).nbytes for _, b in written),
            tokens_written=sum(h.tokens for h in headers),
            raw_bytes_written=sum(codec.HEADER_BYTES + h.raw_bytes for h in headers),
            writes_rejected=0 if result.error else unwritten,
            writes_dropped=unwritten if result.error else 0,
            writes_existing=result.existing,
            evictions=len(result.evicted),
        )
        self.h.recorder.emit("stored", name, [k for k, _ in written])
        self.h.recorder.emit("evicted", name, result.evicted)
