"""The storage-tier contract. Every tier passes tests/integration/test_tier_contract.py.

A tier is a bounded or unbounded map from :data:`ChunkKey` to the encoded bytes of a chunk
(see :mod:`kvtier.codec`). Tiers move bytes; they do not decode or verify them — the store
does, and deletes what fails. Tiers are thread-safe.

Failures: a tier raises (TierUnavailable, OSError, a client's connection error...) when the
medium cannot do the job. It must never return wrong bytes for a key, and a failed write must
never leave a partial value visible under the key.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvtier.keys import ChunkKey
from kvtier.policy.quota import OwnerUsage

Blob = bytes | bytearray | memoryview  # bytearray: a codec.SealedChunk, never written again


def scatter(value: Blob, buffers: Sequence[memoryview]) -> int:
    """Copy ``value`` into ``buffers`` in order when it fits them (their front when it is
    smaller: see :attr:`Tier.fills_front`); return its size."""
    view = memoryview(value).cast("B")
    if view.nbytes <= sum(b.nbytes for b in buffers):
        offset = 0
        for buf in front(buffers, view.nbytes):
            buf[:] = view[offset : offset + buf.nbytes]
            offset += buf.nbytes
    return view.nbytes


def front(buffers: Sequence[memoryview], nbytes: int) -> list[memoryview]:
    """The first ``nbytes`` of ``buffers``, as views of them, in order."""
    out = []
    for buf in buffers:
        if nbytes <= 0:
            break
        out.append(buf[:nbytes])
        nbytes -= out[-1].nbytes
    return out


@dataclass(frozen=True)
class TierUsage:
    chunks: int
    bytes: int
    capacity: int | None  # None: the tier does not bound itself (e.g. Redis uses maxmemory)


@dataclass(frozen=True)
class PutResult:
    """``stored[i]`` tells whether item i is now held; ``evicted`` lists what made room.

    ``error`` is set when the medium failed part-way through the batch: the item that failed
    and all after it are not stored, and what was stored or evicted before is still reported.
    """

    stored: list[bool]
    evicted: list[ChunkKey] = field(default_factory=list)
    error: Exception | None = None
    existing: int = 0  # stored items another writer had stored first (kept, not rewritten)


class Tier(Protocol):
    """One level of the hierarchy (DRAM, local disk, Redis...)."""

    name: str
    zero_copy_reads: bool
    """True when get_many returns views of memory this process already holds (no I/O):
    readers then copy straight out of those views instead of calling read_into_many."""
    fills_front: bool
    """True when read_into_many puts a value smaller than its buffers in their front (a chunk
    stored compressed or quantized, read into buffers sized for its raw form): the reader
    decodes it from there instead of reading it again."""

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is held. May be stale by the time it returns (other writers)."""
        ...

    def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        """The stored bytes of each key, or None where absent. Counts as a use for eviction."""
        ...

    def read_into_many(
        self, items: Sequence[tuple[ChunkKey, Sequence[memoryview]]]
    ) -> list[int | None]:
        """Scatter each stored value into its buffers, in order (like ``preadv``).

        Returns each value's size, or None where absent. The buffers are filled when the size
        equals their total, and their front when it is smaller and :attr:`fills_front`;
        otherwise their contents are unspecified and the caller falls back to
        :meth:`get_many`. Lets a reader load a chunk straight into its destination.
        """
        ...

    def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> PutResult:
        """Store each (key, bytes), replacing an existing value atomically.

        A bounded tier evicts unpinned entries to make room and rejects (stored=False) what
        cannot fit; it never evicts a pinned key. The caller must not mutate the bytes after.
        """
        ...

    def delete(self, key: ChunkKey) -> bool:
        """Remove ``key``; True if it was held. Pins do not prevent an explicit delete."""
        ...

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        """Protect keys from eviction (counted; unknown keys allowed). No-op for tiers that
        cannot evict on their own terms."""
        ...

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        """Release one pin of each key."""
        ...

    def scan(self) -> Iterator[ChunkKey]:
        """Every key held (a snapshot; keys may vanish before they are read)."""
        ...

    def usage(self) -> TierUsage: ...

    def owner_usage(self) -> dict[Hashable, OwnerUsage]:
        """Each owner's (tenant's) part of a tier that divides its room among them (quotas,
        :mod:`kvtier.policy.quota`); empty for a tier that does not."""
        ...

    def read_record(self, name: str) -> bytes | None:
        """A small record kept beside the chunks (``name``: letters, digits, ``-``, ``.``;
        never a chunk, never evicted, outside scan and usage): encryption at rest keeps its
        per-tenant keyring there. None if absent."""
        ...

    def write_record(self, name: str, value: bytes, only_new: bool = False) -> bool:
        """Store a record, replacing it atomically; with ``only_new``, only if it does not
        exist yet (False then: another writer's record stays)."""
        ...

    def delete_record(self, name: str) -> bool:
        """Remove a record; True if it was there."""
        ...

    def close(self) -> None:
        """Release connections and files. Data of persistent tiers stays."""
        ...


RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,127}")


def record_name(name: str) -> str:
    """``name`` if it is a valid record name (ValueError otherwise)."""
    if not RECORD_NAME.fullmatch(name):
        raise ValueError(f"bad record name {name!r}: letters, digits, '-', '.'")
    return name
