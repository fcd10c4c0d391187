"""Host-DRAM tier: a bounded dict of immutable bytes with a pluggable eviction policy."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence

from kvtier.codec import SealedChunk
from kvtier.keys import ChunkKey
from kvtier.policy.eviction import EvictionPolicy, LRUPolicy
from kvtier.policy.quota import OwnerUsage, owner_usage
from kvtier.tiers.base import Blob, PutResult, TierUsage, record_name, scatter


class MemoryTier:
    """Chunks in this process's memory.

    Values are stored as ``bytes`` (copied once on put if given another buffer type, since a
    view may be of memory its owner still changes; a sealed chunk, built in place and never
    written again, is kept as it is) and returned as-is: a reader keeps a valid view even if
    the entry is evicted meanwhile, and reads copy nothing.
    """

    def __init__(
        self,
        capacity: int,
        name: str = "memory",
        policy: EvictionPolicy | None = None,
        owner_of: Callable[[Blob], Hashable] | None = None,
    ):
        """``owner_of``: the owner (tenant) of a stored chunk, for a policy that divides the
        tier among owners (:class:`kvtier.policy.quota.QuotaPolicy`)."""
        if capacity <= 0:
            raise ValueError(f"memory tier capacity must be positive, got {capacity}")
        self.name = name
        self.zero_copy_reads = True
        self.fills_front = True
        self.capacity = capacity
        self._data: dict[ChunkKey, bytes | SealedChunk] = {}
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._lock = threading.Lock()
        self._records: dict[str, bytes] = {}
        self._owner_of = owner_of

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        data = self._data
        return [k in data for k in keys]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        out: list[Blob | None] = []
        with self._lock:
            for key in keys:
                blob = self._data.get(key)
                if blob is not None:
                    self._policy.touch(key)
                out.append(blob)
        return out

    def read_into_many(
        self, items: Sequence[tuple[ChunkKey, Sequence[memoryview]]]
    ) -> list[int | None]:
        blobs = self.get_many([key for key, _ in items])
        return [
            None if blob is None else scatter(blob, buffers)
            for blob, (_, buffers) in zip(blobs, items, strict=True)
        ]

    def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> PutResult:
        stored: list[bool] = []
        evicted: list[ChunkKey] = []
        for key, blob in items:
            value = blob if isinstance(blob, bytes | SealedChunk) else bytes(blob)  # immutable
            size = len(value)
            owner = self._owner_of(value) if self._owner_of is not None else None
            with self._lock:
                self._policy.remove(key)  # a replaced value frees its old size first
                old = self._data.pop(key, None)
                victims = self._policy.victims(size, self.capacity, owner)
                if victims is None:
                    if old is not None:  # keep the old value rather than lose the key
                        self._data[key] = old
                        self._policy.insert(key, len(old), owner)
                    stored.append(False)
                    continue
                for victim in victims:
                    del self._data[victim]  # type: ignore[arg-type]
                    self._policy.remove(victim)
                    evicted.append(victim)  # type: ignore[arg-type]
                self._data[key] = value
                self._policy.insert(key, size, owner)
            stored.append(True)
        return PutResult(stored, evicted)

    def read_record(self, name: str) -> bytes | None:
        return self._records.get(record_name(name))

    def write_record(self, name: str, value: bytes, only_new: bool = False) -> bool:
        with self._lock:
            if only_new and record_name(name) in self._records:
                return False
            self._records[record_name(name)] = bytes(value)
            return True

    def delete_record(self, name: str) -> bool:
        with self._lock:
            return self._records.pop(record_name(name), None) is not None

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            self._policy.remove(key)
            return self._data.pop(key, None) is not None

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.pin(key)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.unpin(key)

    def scan(self) -> Iterator[ChunkKey]:
        with self._lock:
            keys = list(self._data)
        return iter(keys)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(len(self._data), self._policy.used_bytes, self.capacity)

    def owner_usage(self) -> dict[Hashable, OwnerUsage]:
        """Each owner's part of the tier (empty unless its policy divides it among owners)."""
        with self._lock:
            return owner_usage(self._policy, self.capacity)

    def close(self) -> None:
        with self._lock:
            for key in self._data:
                self._policy.remove(key)
            self._data.clear()
