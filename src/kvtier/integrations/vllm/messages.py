"""The messages between the connector's two sides: what the scheduler side tells the worker
side each step (:class:`KvtierConnectorMetadata`: loads, saves, prefetches) and what it hears back
(:class:`KvtierWorkerMetadata`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class LoadSpec:
    """Load tokens [start, end) of a prompt into its blocks. ``start`` is block-aligned
    (vLLM's own hit), ``end`` a multiple of the tail granule; the chunk holding ``end`` is read
    whole and its blocks up to the one holding ``end`` are written (vLLM recomputes the rest of
    that one). With ``tail``, that chunk is the tail of ``tokens`` (a partial chunk, see
    kvtier.keys). With ``background``, the request waits in WAITING_FOR_REMOTE_KVS while the
    load runs."""

    req_id: str
    tokens: list[int]  # prompt tokens of every chunk touched: [0, ceil(end / chunk) * chunk)
    salt: str | None
    block_ids: list[int]  # blocks covering [0, end), the last maybe in part
    start: int
    end: int
    tail: bool = False
    background: bool = False


@dataclass
class SaveSpec:
    """Save chunks [first_chunk, len(tokens) // chunk) from the request's blocks (``tokens``:
    its prompt, or at its end the prompt and the generated tokens computed); with
    ``tail``, the partial chunk after them too (``tokens`` then ends on a tail granule, maybe
    inside a block: ``block_ids`` then ends with that block)."""

    req_id: str
    tokens: list[int]
    salt: str | None
    block_ids: list[int]
    first_chunk: int
    tail: bool = False


@dataclass
class KvtierConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    prefetches: list[tuple[list[int], str | None]] = field(default_factory=list)
    # Finished requests whose blocks vLLM keeps for this step's saves (their generated
    # tokens): the worker reports them done sending once the saves have gathered them.
    releases: list[str] = field(default_factory=list)


@dataclass
class KvtierWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: chunks that entered or left the worker's top (DRAM) tier, and
    what each load read (for the request's log line).

    When vLLM runs the worker in another process, the scheduler's own store cannot see the
    worker's DRAM; this keeps a mirror of it on the scheduler side.
    """

    stored: list[bytes] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)
    loads: list[dict[str, Any]] = field(default_factory=list)  # what each load read (Loader)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KvtierWorkerMetadata)
        return KvtierWorkerMetadata(
            self.stored + other.stored, self.dropped + other.dropped, self.loads + other.loads
        )
