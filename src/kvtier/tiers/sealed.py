"""A tier whose chunks are sealed at rest (:mod:`kvtier.sealing`): any tier, wrapped, with
the keyring of its tenants' epochs kept beside its chunks.

Writes seal each stored chunk before the tier sees it; reads open it again. A chunk that does
not open (tampered with, moved to another key, sealed under a master key this server does
not hold, or under an epoch forgotten since) is returned as it is stored: its magic tells
:func:`kvtier.codec.read_header` what it is, so the store counts it as a corruption, removes
it and recomputes.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvtier.codec import SEALED_MAGIC
from kvtier.keys import ChunkKey
from kvtier.policy.quota import OwnerUsage
from kvtier.sealing import (
    HEAD_BYTES,
    NO_TENANT,
    OVERHEAD,
    TAG_BYTES,
    Sealer,
    plain_bytes,
    sealed_tenant,
)
from kvtier.threads import any_core, load_priority
from kvtier.tiers.base import Blob, PutResult, Tier, TierUsage

OPENERS = max(1, min(4, os.cpu_count() or 1))  # threads reading and decrypting a batch
GROUP = 2  # chunks each of them reads, then decrypts
KEYRING_TTL_S = 1.0  # an epoch read from the tier is trusted this long (forget takes effect)
_RECORD = struct.Struct("<4sH16s")  # magic "KVTK", version, the epoch
_MAGIC, _VERSION = b"KVTK", 1


def keyring_record(tenant: bytes) -> str:
    """The name of a tenant's keyring record in a tier."""
    return "keyring-" + tenant.hex()


class Keyring:
    """Each tenant's epoch in one tier: 16 random bytes, mixed into the tenant's data key,
    created by the first write of the tenant's chunks there. Forgetting a tenant deletes it:
    every chunk sealed under it is then unreadable, here and in any copy, and a later write
    starts a new epoch. Engines sharing the tier agree on it (created only if absent); each
    trusts what it read for :data:`KEYRING_TTL_S`."""

    def __init__(
        self,
        tier: Tier,
        ttl_s: float = KEYRING_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.tier, self.ttl_s, self.clock = tier, ttl_s, clock
        self._known: dict[bytes, tuple[bytes | None, float]] = {}
        self._lock = threading.Lock()

    def epoch(self, tenant: bytes, create: bool = False, fresh: bool = False) -> bytes | None:
        """The tenant's epoch here (None: none, and ``create`` is false); ``fresh`` reads it
        again whatever was read before."""
        known = self._known.get(tenant)
        recent = known is not None and not fresh and self.clock() - known[1] < self.ttl_s
        if known is not None and recent and (known[0] is not None or not create):
            return known[0]
        epoch = _parse(self.tier.read_record(keyring_record(tenant)))
        if epoch is None and create:
            new = _RECORD.pack(_MAGIC, _VERSION, os.urandom(16))
            self.tier.write_record(keyring_record(tenant), new, only_new=True)
            epoch = _parse(self.tier.read_record(keyring_record(tenant)))  # the one that won
        with self._lock:
            self._known[tenant] = (epoch, self.clock())
        return epoch

    def forget(self, tenant: bytes) -> bool:
        """Delete the tenant's epoch (True if there was one)."""
        with self._lock:
            self._known.pop(tenant, None)
        return self.tier.delete_record(keyring_record(tenant))


def _opener_thread() -> None:
    """Like the disk tier's readers: any core, and yielding to the engine's compute."""
    any_core()
    load_priority()


def _parse(record: bytes | None) -> bytes | None:
    if record is None or len(record) != _RECORD.size:
        return None
    magic, version, epoch = _RECORD.unpack(record)
    return epoch if magic == _MAGIC and version == _VERSION else None


@dataclass(frozen=True)
class Forgotten:
    epoch_deleted: bool  # there was an epoch: every chunk sealed under it is now unreadable
    removed: int  # chunks whose header named the tenant, removed afterwards


def forget(
    tier: Tier,
    tenant: bytes,
    keyring: Keyring | None = None,
    progress: Callable[[int], None] | None = None,
) -> Forgotten:
    """Crypto-shred ``tenant``'s chunks in ``tier`` (a sealed tier's storage; no master key
    needed): its epoch deleted first, so from then on none of them opens (engines sharing
    the tier stop within :data:`KEYRING_TTL_S`), then every chunk whose clear header names
    the tenant removed. ``progress(n)`` after every ``n`` chunks looked at."""
    if tenant == NO_TENANT:
        raise ValueError("the chunks of a server without tenants have no tenant to forget")
    deleted = (keyring or Keyring(tier)).forget(tenant)
    head_of = getattr(tier, "header_of", None)
    removed = 0
    for key in list(tier.scan()):
        head = head_of(key, 20) if head_of else tier.get_many([key])[0]
        view = memoryview(head or b"")
        if bytes(view[:4]) == SEALED_MAGIC and bytes(view[12:20]) == tenant:
            removed += int(tier.delete(key))
        if progress is not None:
            progress(1)
    return Forgotten(deleted, removed)


class SealedTier:
    """``inner``, with every chunk sealed by ``sealer`` under its tenant's epoch here."""

    zero_copy_reads = False  # a read decrypts into new memory
    fills_front = False  # its tag would land in the buffers: a smaller chunk is read again

    def __init__(self, inner: Tier, sealer: Sealer):
        self.inner, self.sealer = inner, sealer
        self.name = inner.name
        self.keyring = Keyring(inner)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.inner.contains_many(keys)

    def warm(self) -> None:
        """The inner tier's (:meth:`kvtier.store.TieredStore.warm`)."""
        if (warm := getattr(self.inner, "warm", None)) is not None:
            warm()

    def warm_thread(self) -> None:
        """The inner tier's (:meth:`kvtier.store.TieredStore.warm_thread`)."""
        if (warm := getattr(self.inner, "warm_thread", None)) is not None:
            warm()

    def _open_into(self, key: ChunkKey, sealed: Blob, buffers: Sequence[memoryview]) -> bool:
        tenant = sealed_tenant(sealed)
        if tenant is None:
            return False
        epoch = self.keyring.epoch(tenant)
        if epoch is not None and self.sealer.open_into(key, sealed, buffers, epoch):
            return True
        # Another engine may have started a new epoch since this one read it: read it again.
        again = self.keyring.epoch(tenant, fresh=True)
        if again is None or again == epoch:
            return False
        return self.sealer.open_into(key, sealed, buffers, again)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        out: list[Blob | None] = []
        for key, sealed in zip(keys, self.inner.get_many(keys), strict=True):
            if sealed is None:
                out.append(None)
                continue
            size = plain_bytes(sealed)
            plain = bytearray(size or 0)
            if size is None or not self._open_into(key, sealed, [memoryview(plain)]):
                out.append(sealed)  # unopened: the codec calls it a corruption
                continue
            out.append(plain)
        return out

    def read_into_many(
        self, items: Sequence[tuple[ChunkKey, Sequence[memoryview]]]
    ) -> list[int | None]:
        """Each sealed chunk read straight into the caller's buffers (its clear header and
        tag into buffers of their own), then decrypted where it lies: no copy of the chunk,
        no new memory. Small groups of chunks are read and decrypted on several threads (the
        cipher releases the GIL), so one group is decrypted, still in cache, while the next
        is read."""
        groups = [range(i, min(i + GROUP, len(items))) for i in range(0, len(items), GROUP)]
        sizes: list[int | None] = [None] * len(items)

        def read_group(group: range) -> None:
            heads = [bytearray(HEAD_BYTES) for _ in group]
            tags = [bytearray(TAG_BYTES) for _ in group]
            framed = [
                (items[i][0], [memoryview(heads[n]), *items[i][1], memoryview(tags[n])])
                for n, i in enumerate(group)
            ]
            for n, (i, size) in enumerate(
                zip(group, self.inner.read_into_many(framed), strict=True)
            ):
                key, buffers = items[i]
                if size is None:
                    continue
                plain = size - OVERHEAD
                if plain != sum(b.nbytes for b in buffers):
                    sizes[i] = max(plain, 0)  # another size: the caller reads it whole
                elif self._open_in_place(key, heads[n], buffers, tags[n]):
                    sizes[i] = plain
                else:
                    sizes[i] = -1  # read whole next: a counted corruption

        if len(groups) <= 1:
            for group in groups:
                read_group(group)
            return sizes
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    OPENERS, thread_name_prefix="kvtier-open", initializer=_opener_thread
                )
            pool = self._pool
        list(pool.map(read_group, groups))  # raises what a group raised (a tier failure)
        return sizes

    def _open_in_place(
        self, key: ChunkKey, head: bytearray, buffers: Sequence[memoryview], tag: bytearray
    ) -> bool:
        tenant = bytes(head[12:20])
        epoch = self.keyring.epoch(tenant)
        if epoch is None:
            epoch = self.keyring.epoch(tenant, fresh=True)
        # Decrypting where it lies consumes the ciphertext: no second try with another epoch.
        return epoch is not None and self.sealer.open_in_place(key, head, buffers, tag, epoch)

    def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> PutResult:
        sealed = []
        for key, blob in items:
            epoch = self.keyring.epoch(self.sealer.tenant_of(blob), create=True)
            sealed.append((key, self.sealer.seal(key, blob, epoch or b"")))
        return self.inner.put_many(sealed)

    def forget(self, tenant: bytes) -> Forgotten:
        """:func:`forget` ``tenant`` here."""
        return forget(self.inner, tenant, self.keyring)

    def delete(self, key: ChunkKey) -> bool:
        return self.inner.delete(key)

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        self.inner.pin(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        self.inner.unpin(keys)

    def scan(self) -> Iterator[ChunkKey]:
        return self.inner.scan()

    def usage(self) -> TierUsage:
        return self.inner.usage()

    def owner_usage(self) -> dict[Hashable, OwnerUsage]:
        return self.inner.owner_usage()

    def read_record(self, name: str) -> bytes | None:
        return self.inner.read_record(name)

    def write_record(self, name: str, value: bytes, only_new: bool = False) -> bool:
        return self.inner.write_record(name, value, only_new)

    def delete_record(self, name: str) -> bool:
        return self.inner.delete_record(name)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self.inner.close()
