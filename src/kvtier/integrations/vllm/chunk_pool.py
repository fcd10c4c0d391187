"""Blank chunks for the DRAM tier's first fill, allocated and touched when the engine starts:
for saves, and for chunks promoted into DRAM from slower tiers.

On this kind of machine the first write to newly allocated memory costs about ten times the
copy into it (page faults and zeroing: ~0.7 ms/MB against ~0.07 ms/MB), and saves gather KV
into chunks on the engine's critical path. Paying that at start, for as many chunks as the
DRAM tier holds, keeps it off every step until the tier is full; from then on evictions free
memory that the allocator hands out again. Peers do the same (LMCache and Dynamo's block
manager allocate their host pools up front). Refilling the pool in the background during
serving was measured and is worse: that work competes with the engine's compute threads.

The pool is not counted in the tier's capacity: while chunks promoted from slower tiers fill
the tier, the process holds up to twice the capacity until the pool is used up.
"""

from __future__ import annotations

from kvtier import codec
from kvtier.keys import ChunkKey


class ChunkPool:
    """Up to a reserve of blank chunks of one shape, set by :meth:`reserve` (0 bytes: none)."""

    def __init__(self) -> None:
        self._dtype = ""
        self._shape: tuple[int, ...] = ()
        self._runs = 0
        self._ready: list[codec.SealedChunk] = []

    def reserve(self, dtype: str, shape: tuple[int, ...], nbytes: int, runs: int = 0) -> None:
        """Hold ``nbytes`` worth of blank ``dtype`` chunks of ``shape``, touched now; their
        headers say K and V's ``runs`` (:attr:`kvtier.chunk.KVChunk.runs`)."""
        self._dtype, self._shape, self._runs = dtype, shape, runs
        size = codec.HEADER_BYTES + codec.payload_bytes(dtype, shape)
        # bytearray(n) zero-fills: every page is touched here
        self._ready = [codec.SealedChunk(size) for _ in range(nbytes // size)]

    def take(self, key: ChunkKey, namespace_id: str) -> codec.SealedChunk:
        """A blank chunk for ``key``: a touched one while they last, else a new one."""
        if not self._dtype:
            raise RuntimeError("ChunkPool.take before reserve: the chunk shape is not known")
        try:
            ready = self._ready.pop()  # atomic: a background load may take one meanwhile
        except IndexError:
            return codec.blank(key, self._dtype, self._shape, namespace_id, runs=self._runs)
        return codec.stamp(ready, key, self._dtype, self._shape, namespace_id, runs=self._runs)

    def spare(self, nbytes: int) -> codec.SealedChunk | None:
        """A touched buffer of ``nbytes`` (to read a chunk into), or None: none left, or more
        than this pool's chunks hold. A shorter one (a tail's) is a blank chunk cut to size
        where it lies: a new 3 MB buffer took 1.5-8 ms of page faults, the last read of a
        5,000-token disk hit (2-core Xeon)."""
        try:
            ready = self._ready.pop()  # atomic: saves take from the pool on another thread
        except IndexError:
            return None
        if len(ready) < nbytes:
            self._ready.append(ready)
            return None
        del ready[nbytes:]  # the front, touched, stays where it is
        return ready

    def __len__(self) -> int:
        return len(self._ready)
