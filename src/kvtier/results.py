"""Named results of the store's operations."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from kvtier.codec import KVChunk
from kvtier.deferred import PayloadCheck, StoredForm
from kvtier.keys import ChunkKey


@dataclass(frozen=True)
class OnRead:
    """What a get does with each chunk as soon as it is read and verified, before the others
    (:meth:`kvtier.store.TieredStore.get`): ``call(j, chunk, check)`` on a thread of ``pool``
    (``j`` counts from the get's first chunk; ``check`` as in :attr:`GetResult.checks`). The
    calls may come out of order, and for chunks after one that failed (beyond the run the
    get returns); the get returns once every call has. A chunk read from a lower tier is read
    on a thread of ``io`` (without one: of ``pool``) and then verified and handed on on one of
    ``pool``, so that the device reads on while a load decodes what was read."""

    call: Callable[[int, KVChunk, PayloadCheck | StoredForm | None], object]
    pool: Executor
    io: Executor | None = None  # threads that only read


@dataclass(frozen=True)
class LookupResult:
    """How much of a prompt is cached: ``hit_chunks`` leading chunks, found in ``tiers``.

    When a lookup was asked for tails, the last hit may be a tail of ``tail_tokens`` tokens (a
    partial chunk after the leading run of full chunks, see :mod:`kvtier.keys`); then ``keys``
    are those of the hit chunks, the tail's last.
    """

    keys: list[ChunkKey]  # every full chunk of the prompt, or the hits when a tail hit
    tiers: list[str]  # tier holding each hit chunk (len == hit_chunks)
    chunk_tokens: int
    tail_tokens: int = 0

    @property
    def hit_chunks(self) -> int:
        return len(self.tiers)

    @property
    def hit_tokens(self) -> int:
        if self.tail_tokens:
            return (len(self.tiers) - 1) * self.chunk_tokens + self.tail_tokens
        return len(self.tiers) * self.chunk_tokens


@dataclass(frozen=True)
class GetResult:
    """Consecutive chunks from the requested start; may be shorter than a prior lookup said
    (a chunk evicted or found corrupt meanwhile): the caller recomputes the rest."""

    chunks: list[KVChunk]
    tiers: list[str]
    chunk_tokens: int
    # With check_payload=False, per chunk: the check its payload must pass before its KV is
    # used (kvtier.deferred), or None where the store verified it; with stored_forms, an
    # int4r chunk's verified stored form, for the caller to decode.
    checks: list[PayloadCheck | StoredForm | None] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.chunks) * self.chunk_tokens


@dataclass(frozen=True)
class LoadResult:
    """``chunks`` leading chunks were loaded into the caller's buffers, from ``tiers``."""

    chunks: int
    tiers: list[str]
    chunk_tokens: int

    @property
    def tokens(self) -> int:
        return self.chunks * self.chunk_tokens


@dataclass(frozen=True)
class PutReport:
    new_chunks: int  # chunks the top tier did not hold before
    queued: int  # copies handed to lower tiers
    dropped: int  # copies dropped because a write-behind queue was full
