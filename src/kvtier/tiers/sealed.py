"""A tier whose chunks are sealed at rest (:mod:`kvtier.sealing`): any tier, wrapped.

Writes seal each stored chunk before the tier sees it; reads open it again. A chunk that does
not open (tampered with, moved to another key, sealed under a master key this server does
not hold) is returned as it is stored: its magic tells :func:`kvtier.codec.read_header` what
it is, so the store counts it as a corruption, removes it and recomputes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvtier.keys import ChunkKey
from kvtier.sealing import Sealer, plain_bytes
from kvtier.tiers.base import Blob, PutResult, Tier, TierUsage


class SealedTier:
    """``inner``, with every chunk sealed by ``sealer``."""

    zero_copy_reads = False  # a read decrypts into new memory

    def __init__(self, inner: Tier, sealer: Sealer):
        self.inner, self.sealer = inner, sealer
        self.name = inner.name

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.inner.contains_many(keys)

    def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        out: list[Blob | None] = []
        for key, sealed in zip(keys, self.inner.get_many(keys), strict=True):
            if sealed is None:
                out.append(None)
                continue
            plain = self.sealer.open(key, sealed)
            out.append(sealed if plain is None else plain)  # unopened: a corruption
        return out

    def read_into_many(
        self, items: Sequence[tuple[ChunkKey, Sequence[memoryview]]]
    ) -> list[int | None]:
        sizes: list[int | None] = []
        stored = self.inner.get_many([key for key, _ in items])
        for (key, buffers), sealed in zip(items, stored, strict=True):
            if sealed is None:
                sizes.append(None)
                continue
            size = plain_bytes(sealed)
            if size is None or size != sum(b.nbytes for b in buffers):
                sizes.append(-1 if size is None else size)  # the caller reads it whole
                continue
            sizes.append(size if self.sealer.open_into(key, sealed, buffers) else -1)
        return sizes

    def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> PutResult:
        return self.inner.put_many([(key, self.sealer.seal(key, blob)) for key, blob in items])

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

    def close(self) -> None:
        self.inner.close()
