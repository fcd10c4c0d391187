"""The store's read path: get (into fresh buffers or the tier's own memory), get_into
(straight into the caller's buffers), verification, promotion and prefetch (see
:class:`kvtier.store.TieredStore`; lookups: :mod:`kvtier.lookup`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Any

import numpy as np

from kvtier import codec, deferred
from kvtier.codec import KVChunk
from kvtier.deferred import PayloadCheck, StoredForm
from kvtier.errors import CorruptChunk
from kvtier.hierarchy import Hierarchy, Slot
from kvtier.keys import ChunkKey, Namespace
from kvtier.read_into import ReadInto, promote, walk
from kvtier.results import GetResult, OnRead
from kvtier.sized_reads import Deferred, SizedReads
from kvtier.tiers.base import Blob
from kvtier.writes import Writes

log = logging.getLogger("kvtier")


class Reads:
    """The read path over the hierarchy ``h``; promotions go through ``writes``."""

    def __init__(self, h: Hierarchy, writes: Writes):
        self.h = h
        self.writes = writes
        self.into = ReadInto(h, writes)  # get_into
        self.sized = SizedReads(h, self._verify)  # chunks read into buffers of their size

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
                return self.sized.read(slot, keys, idx, payload_bytes, forms)

            return self.sized.handing_on(
                slot, keys, idx, payload_bytes, forms, on_read.pool, on_read.io, hand_on
            )

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
