"""The store's read path: get (into fresh buffers or the tier's own memory), get_into
(straight into the caller's buffers), verification, promotion and prefetch (see
:class:`kvtier.store.TieredStore`; lookups: :mod:`kvtier.lookup`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from kvtier import codec, deferred, inflate
from kvtier.codec import Compression, KVChunk
from kvtier.deferred import PayloadCheck
from kvtier.errors import CorruptChunk
from kvtier.hierarchy import Hierarchy, Slot
from kvtier.keys import ChunkKey, Namespace
from kvtier.results import GetResult, LoadResult
from kvtier.tiers.base import Blob
from kvtier.writes import Writes

log = logging.getLogger("kvtier")


class Reads:
    """The read path over the hierarchy ``h``; promotions go through ``writes``."""

    def __init__(self, h: Hierarchy, writes: Writes):
        self.h = h
        self.writes = writes

    def get(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        start_chunk: int = 0,
        max_chunks: int | None = None,
        tail: bool = False,
        payload_bytes: Sequence[int] | None = None,
        check_payload: bool = True,
    ) -> GetResult:
        """Verified chunks from ``start_chunk`` on, as many consecutive ones as are available
        (with ``tail``, the trailing partial chunk of ``tokens`` last). ``check_payload=False``:
        raw DRAM chunks come with the check their payload must pass (``GetResult.checks``,
        :mod:`kvtier.deferred`) instead of being hashed here; the caller compares it, as it
        copies them, before using their KV.

        Chunks in DRAM are returned as views of the tier's memory, without a copy. Chunks
        found below the top tier are promoted to the tiers above. With ``payload_bytes`` (the
        KV bytes the caller expects of each chunk, one entry per chunk wanted, as an engine
        loading into its cache knows them), chunks from lower tiers are read straight into
        fresh buffers (the blanks of :meth:`use_blanks` while they last), which are returned
        and promoted as they are: a load copies nothing between the medium and the caller. A
        chunk of another size then ends the run, with a warning.
        """
        keys = self.writes.keys(tokens, namespace, tail)[start_chunk:]
        if payload_bytes is not None:
            keys = keys[: len(payload_bytes)]
        if max_chunks is not None:
            keys = keys[:max_chunks]
        self.h.prefetcher.wait_for(keys)
        checks: dict[ChunkKey, PayloadCheck] | None = None if check_payload else {}
        with self.h.pinned(keys):
            found = self._fetch(keys, payload_bytes, checks)
        self._promote(found)
        chunks = [f[1] for f in found]
        names = [self.h.slots[f[2]].tier.name for f in found]
        pending = [checks.get(f[0]) for f in found] if checks is not None else []
        return GetResult(chunks, names, self.h.chunk_tokens, pending)

    def _walk(
        self, keys: Sequence[ChunkKey], read_from: Callable[[Slot, list[int]], list[bool]]
    ) -> list[int]:
        """Read the leading run of ``keys``, each from the first tier holding it.

        ``read_from(slot, idx)`` reads chunks ``idx`` from one tier and says which verified; a
        chunk that did not (a corrupt DRAM copy, say) is tried again from a lower tier holding
        it. Returns the tier index of each chunk of the longest verified leading run.
        """
        loaded: dict[int, int] = {}
        pending = dict(enumerate(self.h.leading(keys)))  # chunk index -> tier to read it from
        while pending:
            by_tier: dict[int, list[int]] = {}
            for i, t in pending.items():
                by_tier.setdefault(t, []).append(i)
            pending = {}
            for t, idx in by_tier.items():
                for i, ok in zip(idx, read_from(self.h.slots[t], idx), strict=True):
                    if ok:
                        loaded[i] = t
                    elif (lower := self.h.find_below(keys[i], t)) is not None:
                        pending[i] = lower
        run: list[int] = []
        while len(run) in loaded:
            run.append(loaded[len(run)])
        return run

    def _fetch(
        self,
        keys: Sequence[ChunkKey],
        payload_bytes: Sequence[int] | None = None,
        checks: dict[ChunkKey, PayloadCheck] | None = None,
    ) -> list[tuple[ChunkKey, KVChunk, int, Blob]]:
        """(key, chunk, tier index, stored bytes) for the longest verified leading run; see
        :meth:`get` for ``payload_bytes``; ``checks`` collects the payload checks left to the
        caller."""
        got: dict[int, tuple[KVChunk, Blob]] = {}

        def read_from(slot: Slot, idx: list[int]) -> list[bool]:
            if payload_bytes is not None and not slot.tier.zero_copy_reads:
                read = self._read_sized(slot, keys, idx, payload_bytes)
                for i, found in zip(idx, read, strict=True):
                    if found is not None:
                        got[i] = found
                return [i in got for i in idx]
            blobs = self.h.guard(
                slot, [None] * len(idx), slot.tier.get_many, [keys[i] for i in idx]
            )
            for i, blob in zip(idx, blobs, strict=True):
                size = None if payload_bytes is None else payload_bytes[i]
                top = slot is self.h.slots[0]  # never promoted: its check can wait
                chunk = self._verify(slot, keys[i], blob, size, checks if top else None)
                if chunk is not None and blob is not None:
                    got[i] = (chunk, blob)
            return [i in got for i in idx]

        run = self._walk(keys, read_from)
        return [(keys[i], got[i][0], t, got[i][1]) for i, t in enumerate(run)]

    def _read_sized(
        self, slot: Slot, keys: Sequence[ChunkKey], idx: list[int], payload_bytes: Sequence[int]
    ) -> list[tuple[KVChunk, Blob] | None]:
        """Read chunks ``idx`` of a lower tier, each straight into a buffer of its expected
        size, and verify them: (chunk viewing the buffer, the buffer) or None."""
        bufs = [self._blank(codec.HEADER_BYTES + payload_bytes[i]) for i in idx]
        items = [(keys[i], [memoryview(b)]) for i, b in zip(idx, bufs, strict=True)]
        started = time.perf_counter()
        sizes = self.h.guard(slot, [None] * len(idx), slot.tier.read_into_many, items)
        self.h.recorder.add(slot.tier.name, read_seconds=time.perf_counter() - started)
        out: list[tuple[KVChunk, Blob] | None] = []
        for i, buf, size in zip(idx, bufs, sizes, strict=True):
            if size is None:
                self.h.recorder.add(slot.tier.name, misses=1)
                out.append(None)
                continue
            view = memoryview(buf)
            header: codec.ChunkHeader | None = None
            if codec.HEADER_BYTES < size < len(buf) and slot.tier.fills_front:
                out.append(self._inflate(slot, keys[i], buf, size))
                continue
            if size == len(buf):
                try:
                    payload = view[codec.HEADER_BYTES :]
                    header = codec.verify(view[: codec.HEADER_BYTES], payload, keys[i])
                    chunk = KVChunk(header.dtype, header.shape, payload)
                except (CorruptChunk, ValueError) as exc:  # ValueError: an impossible shape
                    self.h.corrupt(slot, keys[i], CorruptChunk(str(exc)))
                    out.append(None)
                    continue
            if header is None or header.compression != Compression.NONE:
                out.append(self._read_whole(slot, keys[i], payload_bytes[i]))
                continue
            self.h.recorder.add(slot.tier.name, hits=1, bytes_read=size)
            out.append((chunk, buf))
        return out

    def _inflate(
        self, slot: Slot, key: ChunkKey, buf: codec.SealedChunk, size: int
    ) -> tuple[KVChunk, Blob] | None:
        """A chunk stored smaller than its raw form (quantized, compressed), read into the
        front of ``buf`` (sized for the raw form): decoded into ``buf`` itself, which then
        holds the raw form (DRAM hits never decode it again)."""
        view = memoryview(buf)
        header, payload = bytearray(codec.HEADER_BYTES), view[codec.HEADER_BYTES :]
        # decoded where it lies (int8; other forms from a copy: quant.decode_bytes_into), then
        # stamped and sealed as the raw chunk it now holds (int4r's decoder hashes as it goes)
        if not self._copy_verified(slot, key, view[:size], header, payload, seal_into=buf):
            return None
        h = codec.read_header(header)
        return KVChunk(h.dtype, h.shape, payload), buf

    def _read_whole(
        self, slot: Slot, key: ChunkKey, payload_bytes: int
    ) -> tuple[KVChunk, Blob] | None:
        """A chunk stored in another form than its buffer's (compressed, another shape):
        read as it is, verified, and held uncompressed so that DRAM hits never inflate it."""
        blob = self.h.guard(slot, [None], slot.tier.get_many, [key])[0]
        chunk = self._verify(slot, key, blob, payload_bytes)
        if chunk is None or blob is None:
            return None
        header = bytearray(memoryview(blob).cast("B")[: codec.HEADER_BYTES])
        whole = codec.join(header, memoryview(chunk.data).cast("B"))
        return KVChunk(chunk.dtype, chunk.shape, memoryview(whole)[codec.HEADER_BYTES :]), whole

    def _blank(self, nbytes: int) -> codec.SealedChunk:
        """A buffer of ``nbytes`` to read a chunk into: a touched blank, else a new one."""
        return self.h.blanks(nbytes) or codec.SealedChunk(nbytes)

    def _verify(
        self,
        slot: Slot,
        key: ChunkKey,
        blob: Any,
        payload_bytes: int | None = None,
        checks: dict[ChunkKey, PayloadCheck] | None = None,
    ) -> KVChunk | None:
        """The verified chunk of ``blob``, or None (a miss; a corrupt chunk is removed). With
        ``payload_bytes``, a chunk of another size is a miss too. With ``checks``, a raw
        chunk's payload is not hashed: its check goes there (:mod:`kvtier.deferred`)."""
        if blob is None:
            self.h.recorder.add(slot.tier.name, misses=1)
            return None
        try:
            opened = deferred.open_raw(blob, key) if checks is not None else None
            chunk = opened[0] if opened else codec.decode(blob, expected_key=key).chunk
            if opened:
                checks[key] = opened[1]  # type: ignore[index]
        except CorruptChunk as exc:
            self.h.corrupt(slot, key, exc)
            return None
        if payload_bytes is not None and chunk.nbytes != payload_bytes:
            log.warning(
                "kvtier: chunk %s in tier %r holds %d bytes of KV, %d were expected: is the"
                " namespace missing something that changes the KV shape?",
                *(key.hex(), slot.tier.name, chunk.nbytes, payload_bytes),
            )
            self.h.recorder.add(slot.tier.name, misses=1)
            return None
        self.h.recorder.add(slot.tier.name, hits=1, bytes_read=len(blob))
        return chunk

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
            run = self._walk(keys, lambda slot, idx: self._load(slot, keys, idx, headers, views))
        self._promote(
            [
                (keys[i], None, t, codec.join(headers[i], views[i], self._blank_for(views[i])))
                for i, t in enumerate(run)
                if t
            ]
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
                self._copy_verified(slot, keys[i], blob, headers[i], views[i])
                for i, blob in zip(idx, blobs, strict=True)
            ]
        items = [(keys[i], [memoryview(headers[i]), views[i]]) for i in idx]
        sizes = self.h.guard(slot, [None] * len(idx), slot.tier.read_into_many, items)
        return [
            self._check_loaded(slot, keys[i], headers[i], views[i], size)
            for i, size in zip(idx, sizes, strict=True)
        ]

    def _copy_verified(
        self,
        slot: Slot,
        key: ChunkKey,
        blob: Any,
        header: bytearray,
        dest: memoryview,
        seal_into: codec.SealedChunk | None = None,
    ) -> bool:
        if blob is None:
            self.h.recorder.add(slot.tier.name, misses=1)
            return False
        size = memoryview(blob).nbytes  # before seal_into's header replaces the stored one
        try:
            inflate.decode_into(blob, dest, expected_key=key, seal_into=seal_into)
        except CorruptChunk as exc:
            self.h.corrupt(slot, key, exc)
            return False
        except ValueError as exc:
            log.warning(
                "kvtier: chunk %s in tier %r does not fit the buffer (%s): is the namespace"
                " missing something that changes the KV shape?",
                key.hex(),
                slot.tier.name,
                exc,
            )
            self.h.recorder.add(slot.tier.name, misses=1)
            return False
        header[:] = memoryview(blob).cast("B")[: codec.HEADER_BYTES]
        self.h.recorder.add(slot.tier.name, hits=1, bytes_read=size)
        return True

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
            return self._copy_verified(slot, key, stored, header, dest)
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
        return self._copy_verified(slot, key, blob, header, dest)

    def corrupt(self, tier: str, key: ChunkKey, reason: str) -> None:
        """Remove ``key`` from ``tier``, whose copy a caller found corrupt (``get`` with
        ``check_payload=False`` leaves the payload's hash to the caller); counted and
        logged as the store's own checks are."""
        slot = next((s for s in self.h.slots if s.tier.name == tier), None)
        if slot is not None:
            self.h.corrupt(slot, key, CorruptChunk(reason))

    def _promote(self, found: Sequence[tuple[ChunkKey, KVChunk | None, int, Blob]]) -> None:
        """Copy chunks read from tier t into tiers 0..t-1 (tier 0 inline, others queued)."""
        for upper in range(len(self.h.slots)):
            items = [(k, blob) for k, _, t, blob in found if t > upper]
            if not items:
                continue
            if upper == 0:
                self.writes.write_to(self.h.slots[0], items)
            else:
                self.writes.enqueue(self.h.slots[upper], items)

    def prefetch(
        self, tokens: Sequence[int] | Any, namespace: Namespace, payload_bytes: int | None = None
    ) -> Future[int]:
        """Promote the cached prefix of ``tokens`` toward the top tier in the background.

        With ``payload_bytes`` (the KV bytes of a whole chunk, as an engine knows them) each
        chunk is read straight into its DRAM copy, as :meth:`get` reads sized chunks. The
        future gives the number of leading tokens the prefetch found; it never raises for a
        tier failure.
        """
        keys = self.writes.keys(tokens, namespace)

        def run() -> int:
            with self.h.pinned(keys):
                where = self.h.leading(keys)
                below = [keys[i] for i, t in enumerate(where) if t > 0]
                sizes = None if payload_bytes is None else [payload_bytes] * len(below)
                if below:
                    self._promote(self._fetch(below, sizes))
            return len(where) * self.h.chunk_tokens

        return self.h.prefetcher.submit(keys, run)
