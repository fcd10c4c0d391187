"""The store's read path: get (into fresh buffers or the tier's own memory), get_into
(straight into the caller's buffers), verification, promotion and prefetch (see
:class:`kvtier.store.TieredStore`; lookups: :mod:`kvtier.lookup`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait
from contextlib import suppress
from typing import Any

import numpy as np

from kvtier import codec, deferred
from kvtier.codec import Compression, KVChunk
from kvtier.deferred import PayloadCheck, StoredForm
from kvtier.errors import CorruptChunk
from kvtier.hierarchy import Hierarchy, Slot
from kvtier.keys import ChunkKey, Namespace
from kvtier.read_into import ReadInto, copy_verified, promote, walk
from kvtier.results import GetResult, OnRead
from kvtier.tiers.base import Blob
from kvtier.writes import Writes

log = logging.getLogger("kvtier")
Deferred = dict[ChunkKey, PayloadCheck | StoredForm]  # what a get leaves to its caller


class Reads:
    """The read path over the hierarchy ``h``; promotions go through ``writes``."""

    def __init__(self, h: Hierarchy, writes: Writes):
        self.h = h
        self.writes = writes
        self.into = ReadInto(h, writes)  # get_into

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
        """Verified chunks from ``start_chunk`` on, as many consecutive ones as are available
        (with ``tail``, the trailing partial chunk of ``tokens`` last). ``check_payload=False``:
        raw DRAM chunks come with the check their payload must pass (``GetResult.checks``,
        :mod:`kvtier.deferred`), which the caller compares as it copies them, before using
        their KV. ``stored_forms``: int4r and int8 chunks come verified but not decoded (their
        check a ``StoredForm`` the caller decodes into place; the chunk's raw-sized buffer
        holds no KV), and are promoted as they are stored.

        Chunks in DRAM are returned as views of the tier's memory, without a copy. Chunks
        found below the top tier are promoted to the tiers above. With ``payload_bytes`` (the
        KV bytes the caller expects of each chunk, one entry per chunk wanted, as an engine
        loading into its cache knows them), chunks from lower tiers are read straight into
        fresh buffers (the blanks of :meth:`use_blanks` while they last), which are returned
        and promoted as they are: a load copies nothing between the medium and the caller. A
        chunk of another size then ends the run, with a warning. ``on_read``: each chunk is
        also handed on as soon as it is verified (:class:`kvtier.results.OnRead`).
        """
        keys = self.writes.keys(tokens, namespace, tail)[start_chunk:]
        if payload_bytes is not None:
            keys = keys[: len(payload_bytes)]
        if max_chunks is not None:
            keys = keys[:max_chunks]
        self.h.prefetcher.wait_for(keys)
        checks: Deferred | None = None if check_payload and not stored_forms else {}
        with self.h.pinned(keys):
            found = self._fetch(
                keys, payload_bytes, checks, not check_payload, stored_forms, on_read
            )
        forms = {k for k, c in (checks or {}).items() if isinstance(c, StoredForm)}
        promote(self.h, self.writes, found, forms)
        chunks = [f[1] for f in found]
        names = [self.h.slots[f[2]].tier.name for f in found]
        pending = [checks.get(f[0]) for f in found] if checks is not None else []
        return GetResult(chunks, names, self.h.chunk_tokens, pending)

    def _fetch(
        self,
        keys: Sequence[ChunkKey],
        payload_bytes: Sequence[int] | None = None,
        checks: Deferred | None = None,
        defer_hash: bool = False,
        stored_forms: bool = False,
        on_read: OnRead | None = None,
    ) -> list[tuple[ChunkKey, KVChunk, int, Blob]]:
        """(key, chunk, tier index, stored bytes) for the longest verified leading run; see
        :meth:`get` for ``payload_bytes`` and ``on_read``; ``checks`` collects what is left to
        the caller: the stored forms it decodes, and (``defer_hash``) DRAM payloads' checks."""
        got: dict[int, tuple[KVChunk, Blob]] = {}
        handed: list[Future[object]] = []  # on_read's calls for chunks of the top tier

        def hand_on(i: int, chunk: KVChunk) -> None:
            if on_read is not None:
                check = checks.get(keys[i]) if checks is not None else None
                on_read.call(i, chunk, check)

        def read_sized(slot: Slot, idx: list[int]) -> list[tuple[KVChunk, Blob] | None]:
            assert payload_bytes is not None
            forms = checks if stored_forms else None
            if on_read is None:
                return self._read_sized(slot, keys, idx, payload_bytes, forms)

            spans: list[tuple[float, float]] = []

            def one(i: int) -> tuple[KVChunk, Blob] | None:
                found = self._read_sized(slot, keys, [i], payload_bytes, forms, spans)[0]
                if found is not None:
                    hand_on(i, found[0])
                return found

            reads: list[Future[tuple[KVChunk, Blob] | None]] = []
            try:
                reads += (on_read.pool.submit(one, i) for i in idx)
            finally:  # a pool refusing a task: those running end before the get does
                wait(reads)
            self.h.recorder.add(slot.tier.name, read_seconds=_covered(spans))
            return [r.result() for r in reads]

        def read_from(slot: Slot, idx: list[int]) -> list[bool]:
            if payload_bytes is not None and not slot.tier.zero_copy_reads:
                for i, found in zip(idx, read_sized(slot, idx), strict=True):
                    if found is not None:
                        got[i] = found
                return [i in got for i in idx]
            blobs = self.h.guard(
                slot, [None] * len(idx), slot.tier.get_many, [keys[i] for i in idx]
            )
            for i, blob in zip(idx, blobs, strict=True):
                size = None if payload_bytes is None else payload_bytes[i]
                top = slot is self.h.slots[0]  # never promoted: its check can wait
                chunk = self._verify(
                    slot, keys[i], blob, size, checks, defer_hash and top, stored_forms
                )
                if chunk is not None and blob is not None:
                    got[i] = (chunk, blob)
                    if on_read is not None:
                        handed.append(on_read.pool.submit(hand_on, i, chunk))
            return [i in got for i in idx]

        try:
            run = walk(self.h, keys, read_from)
        finally:
            wait(handed)
        for done in handed:
            done.result()  # raises what a call raised
        return [(keys[i], got[i][0], t, got[i][1]) for i, t in enumerate(run)]

    def _read_sized(
        self,
        slot: Slot,
        keys: Sequence[ChunkKey],
        idx: list[int],
        payload_bytes: Sequence[int],
        forms: Deferred | None = None,
        spans: list[tuple[float, float]] | None = None,
    ) -> list[tuple[KVChunk, Blob] | None]:
        """Read chunks ``idx`` of a lower tier, each straight into a buffer of its expected
        size, and verify them: (chunk viewing the buffer, what to promote) or None. With
        ``forms``, an int4r or int8 chunk stays in its stored form (:meth:`get`). The read's time is
        counted, or added to ``spans`` for the caller to count once (reads that overlap)."""
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
        out: list[tuple[KVChunk, Blob] | None] = []
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
        if not copy_verified(self.h, slot, key, view[:size], header, payload, seal_into=buf):
            return None
        h = codec.read_header(header)
        return KVChunk(h.dtype, h.shape, payload, h.kv_runs), buf

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
        checks: Deferred | None = None,
        defer_hash: bool = False,
        stored: bool = False,
    ) -> KVChunk | None:
        """The verified chunk of ``blob``, or None (a miss; a corrupt chunk is removed). With
        ``payload_bytes``, a chunk of another size is a miss too. Into ``checks``
        (:mod:`kvtier.deferred`), for a chunk returned only: with ``stored``, an int4r or int8
        chunk's stored form, not decoded (its chunk's buffer holds no KV); with
        ``defer_hash``, a raw chunk's check, not hashed here."""
        if blob is None:
            self.h.recorder.add(slot.tier.name, misses=1)
            return None
        left: PayloadCheck | StoredForm | None = None
        try:
            opened = deferred.open_raw(blob, key) if checks is not None and defer_hash else None
            form = deferred.open_stored(blob, key) if checks is not None and stored else None
            if form is not None:
                chunk = KVChunk(form.dtype, form.shape, np.empty(form.raw_bytes, np.uint8).data)
                left = form
            else:
                chunk = opened[0] if opened else codec.decode(blob, expected_key=key).chunk
                left = opened[1] if opened else None
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
        if left is not None and checks is not None:
            checks[key] = left
        self.h.recorder.add(slot.tier.name, hits=1, bytes_read=len(blob))
        return chunk

    def corrupt(self, tier: str, key: ChunkKey, reason: str) -> None:
        """Remove ``key`` from ``tier``, whose copy a caller found corrupt (``get`` with
        ``check_payload=False`` leaves the payload's hash to the caller); counted and
        logged as the store's own checks are."""
        slot = next((s for s in self.h.slots if s.tier.name == tier), None)
        if slot is not None:
            self.h.corrupt(slot, key, CorruptChunk(reason))

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
                    promote(self.h, self.writes, self._fetch(below, sizes))
            return len(where) * self.h.chunk_tokens

        return self.h.prefetcher.submit(keys, run)


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
