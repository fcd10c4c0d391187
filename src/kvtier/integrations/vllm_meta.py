"""What the connector's scheduler side tracks of a request, tells its worker side each step,
and hears back."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvtier.config import LOAD_MODES
from kvtier.errors import ConfigError

requests_log = logging.getLogger("kvtier.requests")


@dataclass(frozen=True)
class ConnectorOptions:
    """The connector's own keys in ``kv_connector_extra_config`` (the rest is the store's
    configuration): how hits load, the router feed's port, where vLLM publishes its KV
    events, write-through (a prefill engine's answer must not return before its chunks
    are in every tier: the decode engine loads them from the shared one), and the engine's
    dtype as ``kvtier serve`` chose it (reported in ``/kvtier/info``)."""

    loads: str = "auto"
    feed_port: int | None = None
    kv_events: dict[str, Any] | None = None
    write_through: bool = False
    engine_dtype: dict[str, Any] | None = None

    @classmethod
    def take(cls, extra: dict[str, Any]) -> ConnectorOptions:
        """The options, popped from ``extra``; bad values raise ConfigError."""
        where = "kv_connector_extra_config"
        options = cls(
            extra.pop("loads", "auto"), extra.pop("feed_port", None),
            extra.pop("kv_events", None), extra.pop("write_through", False),
            extra.pop("engine_dtype", None),
        )  # fmt: skip
        if options.loads not in LOAD_MODES:
            raise ConfigError(f"{where}: loads: expected one of {', '.join(LOAD_MODES)}, got"
                              f" {options.loads!r}")  # fmt: skip
        port = options.feed_port
        if port is not None and not (isinstance(port, int) and 0 <= port < 65536):
            raise ConfigError(f"{where}: feed_port: expected a port number, got {port!r}")
        if not isinstance(options.write_through, bool):
            raise ConfigError(f"{where}: write_through: expected true or false, got"
                              f" {options.write_through!r}")  # fmt: skip
        return options


REPORT_STEPS = 8  # steps a finished request's line waits for its load report


@dataclass
class RequestAccount:
    """One request's tokens, for the line it logs when it ends (``kvtier.requests``): prompt
    tokens, those vLLM's own prefix cache had, those kvtier was to load and what the worker
    loaded from each tier in how long, and what was left to compute."""

    request: str
    prompt_tokens: int
    vllm_prefix_tokens: int
    planned: int  # tokens kvtier was to load
    loaded: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    failed_tokens: int = 0
    reported: bool = False
    waited: int = 0

    def add(self, report: dict[str, Any]) -> None:
        for tier, tokens in report.get("loaded", {}).items():
            self.loaded[tier] = self.loaded.get(tier, 0) + int(tokens)
        self.load_s += float(report.get("load_s", 0.0))
        self.failed_tokens += int(report.get("failed_tokens", 0))
        self.reported = True

    def line(self) -> dict[str, Any]:
        loaded = sum(self.loaded.values())
        return {
            "request": self.request, "prompt_tokens": self.prompt_tokens,
            "vllm_prefix_tokens": self.vllm_prefix_tokens, "kvtier_hit_tokens": self.planned,
            "loaded_tokens": self.loaded, "load_s": round(self.load_s, 4),
            "failed_tokens": self.failed_tokens,
            "recomputed_tokens": self.prompt_tokens - self.vllm_prefix_tokens - loaded,
            "reported": self.reported or not self.planned,
        }  # fmt: skip

    def log(self) -> None:
        requests_log.info("kvtier request %s", json.dumps(self.line(), sort_keys=True))


@dataclass
class Tracked:
    """Scheduler-side state of a running request."""

    prompt: list[int]
    salt: str | None
    block_ids: list[int]
    saved_tokens: int  # prompt tokens already in kvtier (held, loaded or saved; a tail too)


@dataclass
class LoadSpec:
    """Load tokens [start, end) of a prompt into its blocks. Both ends are block-aligned; the
    chunk holding ``end`` is read whole and only its blocks before ``end`` are written. With
    ``tail``, that chunk is the tail of ``tokens`` (a partial chunk, see kvtier.keys). With
    ``background``, the request waits in WAITING_FOR_REMOTE_KVS while the load runs."""

    req_id: str
    tokens: list[int]  # prompt tokens of every chunk touched: [0, ceil(end / chunk) * chunk)
    salt: str | None
    block_ids: list[int]  # blocks covering [0, end)
    start: int
    end: int
    tail: bool = False
    background: bool = False


@dataclass
class SaveSpec:
    """Save prompt chunks [first_chunk, len(tokens) // chunk) from the request's blocks; with
    ``tail``, the partial chunk after them too (``tokens`` then ends on a block boundary)."""

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
