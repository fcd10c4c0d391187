"""Chunks of a tier below DRAM read straight into buffers of the size the caller expects
(an engine's load knows its chunks' bytes), then verified: held raw, kept in their stored
form for the caller to decode into place (:mod:`kvtier.deferred`), or inflated where they lie.
Part of the store's read path (:mod:`kvtier.reads`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait
from contextlib import suppress
from typing import Any

import numpy as np

from kvtier import codec, deferred
from kvtier.codec import Compression, KVChunk
from kvtier.deferred import PayloadCheck, StoredForm
from kvtier.errors import CorruptChunk
from kvtier.hierarchy import Hierarchy, Slot
from kvtier.keys import ChunkKey
from kvtier.read_into import copy_verified
from kvtier.tiers.base import Blob

Deferred = dict[ChunkKey, PayloadCheck | StoredForm]  # what a get leaves to its caller
Read = tuple[list[codec.SealedChunk], list[int | None]]  # buffers, and the sizes read into them
Found = tuple[KVChunk, Blob] | None  # a chunk verified (viewing its buffer) and what to promote


class SizedReads:
    """Reads of chunks into buffers of their expected size, over the hierarchy ``h``;
    ``verify(slot, key, blob, payload_bytes)`` verifies a chunk read whole (the store's)."""

    def __init__(self, h: Hierarchy, verify: Callable[[Slot, ChunkKey, Any, int], KVChunk | None]):
        self.h = h
        self._verify = verify

    def read(
        self,
        slot: Slot,
        keys: Sequence[ChunkKey],
        idx: list[int],
        payload_bytes: Sequence[int],
        forms: Deferred | None = None,
    ) -> list[Found]:
        """Read chunks ``idx`` of a lower tier, each straight into a buffer of its expected
        size, and verify them: (chunk viewing the buffer, what to promote) or None. With
        ``forms``, an int4r, k8v4 or int8 chunk stays in its stored form
        (:meth:`kvtier.reads.Reads.get`)."""
        return self._checked(
            slot, keys, idx, payload_bytes, forms, self._read_raw(slot, keys, idx, payload_bytes)
        )

    def handing_on(
        self,
        slot: Slot,
        keys: Sequence[ChunkKey],
        idx: list[int],
        payload_bytes: Sequence[int],
        forms: Deferred | None,
        pool: Executor,
        io: Executor | None,
        hand_on: Callable[[int, KVChunk], None],
    ) -> list[Found]:
        """:meth:`read`, each chunk handed on as soon as it is verified: read on a thread
        of ``io`` (else of ``pool``), then verified and handed on on one of ``pool`` while the
        reads go on (see :class:`kvtier.results.OnRead`). Reads that overlap are counted
        once."""
        spans: list[tuple[float, float]] = []

        def check(i: int, read: Read) -> Found:
            found = self._checked(slot, keys, [i], payload_bytes, forms, read)[0]
            if found is not None:
                hand_on(i, found[0])
            return found

        def read(i: int) -> Future[Found]:
            return pool.submit(check, i, self._read_raw(slot, keys, [i], payload_bytes, spans))

        reads: list[Future[Future[Found]]] = []
        checks: list[Future[Found]] = []
        try:
            reads += ((io or pool).submit(read, i) for i in idx)
        finally:  # a pool refusing a task: those running end before the get does
            wait(reads)
            checks += (r.result() for r in reads if r.exception() is None)
            wait(checks)
        self.h.recorder.add(slot.tier.name, read_seconds=_covered(spans))
        return [r.result().result() for r in reads]

    def _read_raw(
        self,
        slot: Slot,
        keys: Sequence[ChunkKey],
        idx: list[int],
        payload_bytes: Sequence[int],
        spans: list[tuple[float, float]] | None = None,
    ) -> Read:
        """Read chunks ``idx`` of a lower tier, each into a buffer of its expected size: the
        buffers and the sizes read (None: absent). The read's time is counted, or added to
        ``spans``."""
        bufs = [self._blank(codec.HEADER_BYTES + payload_bytes[i]) for i in idx]
        items = [(keys[i], [memoryview(b)]) for i, b in zip(idx, bufs, strict=True)]
        started = time.perf_counter()
        sizes = self.h.guard(slot, [None] * len(idx), slot.tier.read_into_many, items)
        if spans is None:
            self.h.recorder.add(slot.tier.name, read_seconds=time.perf_counter() - started)
        else:
            spans.append((started, time.perf_counter()))
        for _, (read_view,) in items:  # a stored form is cut to its size where it lies
            with suppress(BufferError):  # held by a tier still: _cut copies instead
                read_view.release()
        return bufs, sizes

    def _checked(
        self,
        slot: Slot,
        keys: Sequence[ChunkKey],
        idx: list[int],
        payload_bytes: Sequence[int],
        forms: Deferred | None,
        read: Read,
    ) -> list[Found]:
        """Verify chunks ``idx`` as :meth:`_read_raw` read them, as :meth:`read` returns
        them."""
        bufs, sizes = read
        out: list[Found] = []
        for i, buf, size in zip(idx, bufs, sizes, strict=True):
            if size is None:
                self.h.recorder.add(slot.tier.name, misses=1)
                out.append(None)
                continue
            header: codec.ChunkHeader | None = None
            if codec.HEADER_BYTES < size < len(buf) and slot.tier.fills_front:
                stored = self._stored(slot, keys[i], buf, size, forms)
                if stored == ():
                    stored = self._inflate(slot, keys[i], buf, size)
                out.append(stored)  # type: ignore[arg-type]
                continue
            view = memoryview(buf)
            if size == len(buf):
                try:
                    payload = view[codec.HEADER_BYTES :]
                    header = codec.verify(view[: codec.HEADER_BYTES], payload, keys[i])
                    chunk = KVChunk(header.dtype, header.shape, payload, header.kv_runs)
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

    def _stored(
        self, slot: Slot, key: ChunkKey, buf: codec.SealedChunk, size: int, forms: Deferred | None
    ) -> tuple[KVChunk, Blob] | tuple[()] | None:
        """An int4r or int8 chunk read into the front of ``buf`` (a raw-sized buffer), verified and
        left in its stored form (``forms``): (a chunk of the raw shape, whose buffer holds no
        KV, the stored form to promote); ``()`` where it is not one (the caller decodes), None
        where it is corrupt or of another size. ``buf`` is cut to the stored form where it
        lies: no copy, and no new memory to fault in (a copy of each 1.75 MB chunk cost ~2 ms
        of CPU in a served engine, a fifth of a 5,000-token disk hit's)."""
        try:
            form = deferred.open_stored(memoryview(buf)[:size], key) if forms is not None else None
        except CorruptChunk as exc:
            self.h.corrupt(slot, key, exc)
            return None
        if form is None or forms is None:
            return ()
        if form.raw_bytes != len(buf) - codec.HEADER_BYTES:
            self.h.recorder.add(slot.tier.name, misses=1)
            return None
        form = dataclasses.replace(form, payload=memoryview(b""))  # lets go of buf
        stored = _cut(buf, size)  # what DRAM holds: the stored form, not the raw buffer
        forms[key] = dataclasses.replace(form, payload=memoryview(stored)[codec.HEADER_BYTES :])
        self.h.recorder.add(slot.tier.name, hits=1, bytes_read=size)
        return KVChunk(form.dtype, form.shape, np.empty(form.raw_bytes, np.uint8).data), stored

    def _inflate(self, slot: Slot, key: ChunkKey, buf: codec.SealedChunk, size: int) -> Found:
        """A chunk stored smaller than its raw form (quantized, compressed), read into the
        front of ``buf`` (sized for the raw form): decoded into ``buf`` itself, which then
        holds the raw form (DRAM hits never decode it again)."""
        view = memoryview(buf)
        header, payload = bytearray(codec.HEADER_BYTES), view[codec.HEADER_BYTES :]
        # decoded where it lies (int8; other forms from a copy: quant.decode_bytes_into), then
        # stamped and sealed as the raw chunk it now holds (int4r's decoder hashes as it goes)
        if not copy_verified(self.h, slot, key, view[:size], header, payload, seal_into=buf):
            return None
        h = codec.read_header(header)
        return KVChunk(h.dtype, h.shape, payload, h.kv_runs), buf

    def _read_whole(self, slot: Slot, key: ChunkKey, payload_bytes: int) -> Found:
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


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of ``spans`` ran."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def _cut(buf: codec.SealedChunk, size: int) -> Blob:
    """``buf``'s first ``size`` bytes: ``buf`` itself, shrunk where it lies (the allocator
    keeps the front in place), or a copy where something still views it."""
    try:
        del buf[size:]
    except BufferError:
        return bytes(memoryview(buf)[:size])
    return buf
