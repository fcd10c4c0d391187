"""vLLM v1 KV connector: vLLM loads prompt KV from kvtier's tiers instead of recomputing it.

Use with ``--kv-transfer-config '{"kv_connector": "KvtierConnector",
"kv_connector_module_path": "kvtier.integrations.vllm", "kv_role": "kv_both",
"kv_connector_extra_config": {<kvtier configuration, as in kvtier.yaml>}}'``.

Scheduler side: :meth:`get_num_new_matched_tokens` asks the store how many leading prompt tokens
it holds (whole chunks, then a tail of whole blocks, leaving at least one token to compute); the
metadata of each step lists the chunks to load into the request's blocks and the newly completed
prompt chunks to save, and once a prompt is computed, its tail: the full blocks after its last
full chunk, so that reuse is as fine-grained as vLLM's own blocks. While other requests run, a
hit from disk or Redis is loaded in the background (the request waits in WAITING_FOR_REMOTE_KVS;
``loads`` in the extra config: auto, async or sync). Worker side (:mod:`.loader`): loads copy
each chunk once, from where kvtier holds it into the blocks; saves gather the blocks straight
into encoded chunks, leaving checksums and tier writes to a background thread. Chunks that fail to
load are reported through :meth:`get_block_ids_with_load_errors` for vLLM to recompute (kvtier
sets ``kv_load_failure_policy=recompute``: a cache must never fail a request). With
``write_through`` (a prefill engine of a disaggregated pod), saves write every tier inline, so
the request's answer leaves only once the shared tier holds its prompt.
"""

from __future__ import annotations

import atexit
import logging
import math
import re
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvtier.config import DiskTierConfig, MemoryTierConfig, config_from_dict
from kvtier.errors import ConfigError
from kvtier.integrations import shared_stores
from kvtier.integrations.chunk_pool import ChunkPool
from kvtier.integrations.feed import EventFeed, store_feed
from kvtier.integrations.loader import Loader
from kvtier.integrations.metrics import (
    RATE_FILE,
    ConnectorMetrics,
    KvtierPromMetrics,
    KvtierStats,
)
from kvtier.integrations.model import model_fingerprint
from kvtier.integrations.paged import TORCH_DTYPES, block_view, kv_dtype_name
from kvtier.integrations.saver import Saver
from kvtier.integrations.vllm_meta import (
    ConnectorOptions,
    KvtierConnectorMetadata,
    KvtierWorkerMetadata,
    LoadSpec,
    RequestAccount,
    SaveSpec,
    Tracked,
)
from kvtier.keys import ChunkKey, Namespace, tail_candidates
from kvtier.results import LookupResult
from kvtier.stats import ChunkEvent

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier")
if not log.handlers:  # inside vLLM nobody configures kvtier's logger: say what happens
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("kvtier %(levelname)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

_connectors: weakref.WeakSet[KvtierConnector] = weakref.WeakSet()


def flush_all(timeout: float | None = None) -> None:
    """Wait for every connector's pending saves and the stores' lower-tier writes."""
    for connector in list(_connectors):
        connector._saver.wait()
    for store in shared_stores.open_stores():
        store.flush(timeout)


@atexit.register
def _close_all() -> None:
    # vLLM does not always call shutdown() before the interpreter exits; queued writes to
    # lower tiers would be lost with the write-behind threads.
    try:
        flush_all(timeout=30)
    finally:
        shared_stores.close_all()


class KvtierConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        options = ConnectorOptions.take(extra)  # what kvtier serve adds to the store's config
        self._loads, self._feed_port = options.loads, options.feed_port
        self._kv_events, self._write_through = options.kv_events, options.write_through
        self._engine_dtype = options.engine_dtype
        self._feed: EventFeed | None = None
        self._config = config_from_dict(extra, "kv_connector_extra_config")
        self._block_size = vllm_config.cache_config.block_size
        self._chunk = self._config.chunk_tokens
        if self._chunk % self._block_size:
            raise ConfigError(
                f"kv_connector_extra_config: chunk_tokens: {self._chunk} is not a multiple of"
                f" vLLM's block size {self._block_size}"
            )
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.info("kvtier: setting kv_load_failure_policy=recompute (a miss must not fail)")
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        model = vllm_config.model_config.model
        self._ns_model = Path(model).name if Path(model).is_dir() else model
        self._ns_revision = model_fingerprint(model, vllm_config.model_config.revision)
        # The namespace must be the same on the scheduler side, which never sees the cache
        # tensors, and on the worker side: both derive it from the configuration.
        self._kv_dtype = kv_dtype_name(
            vllm_config.model_config.dtype, str(vllm_config.cache_config.cache_dtype)
        )
        self._store = shared_stores.acquire(self._config)
        # scheduler side
        self._tracked: dict[str, Tracked] = {}
        self._local_hits: dict[str, int] = {}
        disk = next((t for t in self._config.tiers if isinstance(t, DiskTierConfig)), None)
        self._metrics = ConnectorMetrics(Path(disk.path) / RATE_FILE if disk else None)
        self._salts: dict[str, str | None] = {}
        self._pending_loads: dict[str, tuple[int, int]] = {}  # req -> (start, end)
        self._in_background: set[str] = set()  # requests whose next load is a background one
        self._background_loads: list[LoadSpec] = []  # planned, for the next step's metadata
        self._loading: set[str] = set()  # background loads the worker has not reported done
        self._held: dict[str, int] = {}  # req -> leading prompt tokens kvtier already holds
        self._worker_top: set[bytes] = set()  # mirror of the worker's DRAM tier
        self._waiting: dict[str, tuple[list[int], str | None]] = {}  # prefetch candidates
        # worker side
        self._layers: list[torch.Tensor] = []
        self._loader: Loader | None = None  # made once the KV cache is known
        self._pool = ChunkPool()
        self._saver = Saver(self._store, self._pool, self._namespace, self._block_size,
                            self._kv_dtype, self._write_through, self._announce)  # fmt: skip
        self._events_lock = threading.Lock()
        self._events = KvtierWorkerMetadata()
        if role == KVConnectorRole.WORKER:
            top = self._store.tiers[0].name
            self._store.subscribe(lambda e: self._on_event(e) if e.tier == top else None)
        _connectors.add(self)

    def _namespace(self, salt: str | None) -> Namespace:
        return Namespace(
            self._ns_model, self._ns_revision, self._kv_dtype, tenant_salt=salt or None
        )

    # -- scheduler side --------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self._salts[request.request_id] = request.cache_salt
        tokens = list(request.prompt_token_ids or [])
        if len(tokens) > self._chunk:
            self._waiting[request.request_id] = (tokens, request.cache_salt)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._loading.difference_update(connector_output.finished_recving or ())
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, KvtierWorkerMetadata):
            self._worker_top.difference_update(meta.dropped)
            self._worker_top.update(meta.stored)
            self._metrics.reported(meta.loads)
        self._metrics.tick()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This interval's metrics: requests on the scheduler side, tiers on the worker's."""
        if self.role == KVConnectorRole.WORKER:
            if self._store is None:
                return None
            return self._metrics.worker_stats(self._store, self._saver.took())
        return self._metrics.scheduler_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return KvtierStats(data or {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return KvtierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _lookup(self, tokens: list[int], salt: str | None) -> LookupResult:
        """Leading tokens held by kvtier (whole chunks, then a tail of whole blocks): in this
        process's tiers or the worker's DRAM."""
        namespace = self._namespace(salt)
        workers = [c for c in list(_connectors) if c.role == KVConnectorRole.WORKER]
        if workers:  # a save still under way may hold this very prefix (or a tail of it)
            keys = self._store.keys(tokens, namespace)
            args = (tokens, namespace, self._chunk, self._block_size, keys)
            probe = keys + [k for n in range(len(keys) + 1) for _, k in tail_candidates(*args, n)]
            for worker in workers:
                worker._saver.wait(probe)
        elsewhere = self._worker_top if not workers else frozenset()
        return self._store.lookup(tokens, namespace, elsewhere, self._block_size)

    def _in_dram(self, found: LookupResult, start: int, end: int) -> bool:
        """Whether the hit chunks covering tokens [start, end) are all in the worker's DRAM."""
        top = self._config.tiers[0]
        dram = top.name if isinstance(top, MemoryTierConfig) else None
        hits = zip(found.keys, found.tiers, strict=False)
        wanted = list(hits)[start // self._chunk : -(-end // self._chunk)]
        # The scheduler's own store names the first tier it finds a chunk in (disk, say),
        # though the worker may hold it in DRAM too: the mirror of the worker's DRAM decides.
        return all(tier in (dram, "elsewhere") or key in self._worker_top for key, tier in wanted)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        self._salts[request.request_id] = request.cache_salt
        found = self._lookup(tokens, request.cache_salt)
        hit = found.hit_tokens
        self._held[request.request_id] = hit  # those chunks need no saving
        # vLLM must compute at least the last prompt token itself. Loads are block-granular:
        # the last chunk may be used in part, so no more than one block is recomputed.
        usable = min(hit, (len(tokens) - 1) // self._block_size * self._block_size)
        self._local_hits[request.request_id] = num_computed_tokens
        self._metrics.looked_up(RequestAccount(
            request.request_id, len(tokens), num_computed_tokens,
            max(usable - num_computed_tokens, 0),
        ))  # fmt: skip
        self._in_background.discard(request.request_id)
        if usable <= num_computed_tokens:
            return 0, False
        # While other requests run, a load from disk or Redis runs in the background, so
        # that their streams do not stall for it. A DRAM hit, or a load with no one else to
        # stall, runs before the forward pass: it is faster there (all cores, no round trip
        # through WAITING_FOR_REMOTE_KVS).
        others = any(r != request.request_id for r in (*self._tracked, *self._loading))
        background = self._loads == "async" or (
            self._loads == "auto"
            and others
            and not self._in_dram(found, num_computed_tokens, usable)
        )
        if background:
            self._in_background.add(request.request_id)
        return usable - num_computed_tokens, background

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        req_id = request.request_id
        local = self._local_hits.pop(req_id, 0)
        if num_external_tokens <= 0:
            return
        span = (local, local + num_external_tokens)
        if req_id not in self._in_background:
            self._pending_loads[req_id] = span
            return
        # vLLM now holds the request in WAITING_FOR_REMOTE_KVS, out of the scheduled ones
        # until the worker reports the load done: plan the load with the blocks just given.
        self._in_background.discard(req_id)
        self._waiting.pop(req_id, None)  # no prefetch: the load reads it already
        tokens = list(request.prompt_token_ids or [])
        block_ids = list(blocks.get_block_ids()[0])
        tracked = Tracked(tokens, request.cache_salt, block_ids, self._held.get(req_id, 0))
        self._background_loads.append(self._load_spec(req_id, tracked, span, background=True))
        self._loading.add(req_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        self._metrics.rate.step(scheduler_output.total_num_scheduled_tokens)
        meta = KvtierConnectorMetadata(loads=self._background_loads)
        self._background_loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            salt = self._salts.get(new.req_id)  # NewRequestData does not carry cache_salt
            held = self._held.pop(new.req_id, 0)
            started = Tracked(prompt, salt, list(new.block_ids[0]), held)
            self._tracked[new.req_id] = started
            self._plan_load(meta, new.req_id, started)
            computed = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            self._plan_save(meta, new.req_id, started, computed)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted and back: all blocks are new
                tracked.block_ids = list(new_blocks[0]) if new_blocks else []
                tracked.saved_tokens = self._held.pop(req_id, 0)
                self._plan_load(meta, req_id, tracked)
            elif new_blocks:
                tracked.block_ids.extend(new_blocks[0])
            computed = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            self._plan_save(meta, req_id, tracked, computed)
        self._pending_loads.clear()
        # Requests that arrived but were not scheduled this step wait for blocks: have the
        # worker warm its DRAM from slower tiers meanwhile (once per request). Scheduled ones
        # load right now; a prefetch would only read the same bytes twice.
        for new in scheduler_output.scheduled_new_reqs:
            self._waiting.pop(new.req_id, None)
        meta.prefetches = list(self._waiting.values())
        self._waiting.clear()
        return meta

    def _plan_load(self, meta: KvtierConnectorMetadata, req_id: str, tracked: Tracked) -> None:
        span = self._pending_loads.get(req_id)
        if span is not None:
            meta.loads.append(self._load_spec(req_id, tracked, span))

    def _load_spec(
        self, req_id: str, tracked: Tracked, span: tuple[int, int], background: bool = False
    ) -> LoadSpec:
        start, end = span
        held = tracked.saved_tokens  # what the lookup found: whole chunks, then maybe a tail
        full = held - held % self._chunk
        tail = end > full  # only the tail covers `end`
        # The chunk holding `end` is stored whole (or as the tail): it is read whole.
        whole = held if tail else -(-end // self._chunk) * self._chunk
        blocks = tracked.block_ids[: end // self._block_size]
        return LoadSpec(
            req_id, tracked.prompt[:whole], tracked.salt, blocks, start, end, tail, background
        )

    def _plan_save(
        self, meta: KvtierConnectorMetadata, req_id: str, tracked: Tracked, computed: int
    ) -> None:
        prompt = len(tracked.prompt)
        done = min(computed, prompt) // self._chunk * self._chunk
        if done > tracked.saved_tokens:
            first = tracked.saved_tokens // self._chunk
            blocks = tracked.block_ids[: done // self._block_size]
            meta.saves.append(SaveSpec(req_id, tracked.prompt[:done], tracked.salt, blocks, first))
            tracked.saved_tokens = done
        # Once the whole prompt is computed, its full blocks after the last full chunk are
        # saved as a tail: a later prompt sharing them reuses them as vLLM's own cache would.
        end = prompt // self._block_size * self._block_size
        if computed >= prompt and end % self._chunk and end > tracked.saved_tokens:
            first = end // self._chunk
            blocks = tracked.block_ids[: end // self._block_size]
            meta.saves.append(
                SaveSpec(req_id, tracked.prompt[:end], tracked.salt, blocks, first, tail=True)
            )
            tracked.saved_tokens = end

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        self._metrics.finished(request.request_id)
        self._in_background.discard(request.request_id)
        self._local_hits.pop(request.request_id, None)
        self._held.pop(request.request_id, None)
        self._salts.pop(request.request_id, None)
        self._waiting.pop(request.request_id, None)
        # The worker may still be writing into the blocks of a request that ended during its
        # background load: they must stay its own until the worker reports the load done
        # (vLLM 0.32 keeps them for a request aborted in WAITING_FOR_REMOTE_KVS anyway).
        return request.request_id in self._loading, None

    # -- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def layer_index(name: str) -> tuple[int, str]:
            match = re.search(r"layers\.(\d+)\.", name)
            return (int(match.group(1)) if match else 0, name)

        model = self._vllm_config.model_config
        heads = model.get_num_kv_heads(self._vllm_config.parallel_config)
        head_dim = model.get_head_size()
        ordered = [kv_caches[name] for name in sorted(kv_caches, key=layer_index)]
        try:
            self._layers = [block_view(t, heads, head_dim) for t in ordered]
        except ValueError as exc:
            raise ConfigError(f"kvtier cannot use this KV cache: {exc}") from None
        first = ordered[0]
        if self._layers[0].shape[2] != self._block_size:
            raise ConfigError(
                f"KV cache blocks hold {self._layers[0].shape[2]} tokens, vLLM's block size"
                f" is {self._block_size}"
            )
        if TORCH_DTYPES.get(first.dtype) != self._kv_dtype:
            raise ConfigError(f"KV cache is {first.dtype}, the configuration said {self._kv_dtype}")
        self._loader = Loader(
            self._store, self._layers, self._chunk, self._namespace, self._saver.wait
        )
        self._saver.bind(self._layers, self._loader.chunk_shape)
        shape = self._loader.chunk_shape()
        top = self._config.tiers[0] if self._config.tiers else None
        fill = top.capacity if isinstance(top, MemoryTierConfig) and top.prefault else 0
        self._pool.reserve(self._kv_dtype, shape, fill)  # the DRAM tier's first fill
        self._store.use_blanks(self._pool.spare)  # promotions from disk/Redis too
        if self._feed_port is not None:
            self._start_feed(self._feed_port, shape)

    def _start_feed(self, port: int, chunk_shape: tuple[int, ...]) -> None:
        """Publish what this worker's store holds, for ``kvtier router`` (see integrations.feed)."""
        per_token = math.prod(chunk_shape) * self._layers[0].element_size() // self._chunk
        feed = store_feed(self._store, self._config, self._namespace(None), self._block_size,
                          per_token, self._kv_events, self._engine_dtype)  # fmt: skip
        self._feed = feed if feed.start("127.0.0.1", port) else None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # vLLM calls start_load_kv after the forward pass when no load must precede it: start
        # background loads now instead, a whole step earlier.
        if isinstance(connector_metadata, KvtierConnectorMetadata) and self._loader is not None:
            for spec in connector_metadata.loads:
                if spec.background:
                    self._loader.start(spec)
            connector_metadata.loads = [s for s in connector_metadata.loads if not s.background]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        for tokens, salt in meta.prefetches:  # requests that wait: warm DRAM meanwhile
            self._store.prefetch(tokens, self._namespace(salt))
        if self._loader is not None:
            for spec in meta.loads:  # the forward pass about to run needs these
                self._loader.load(spec)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete in start_load_kv, before the forward pass."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Saves happen in wait_for_save, once every layer of the step is computed."""

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        self._saver.save(meta.saves)

    def _announce(self, keys: Sequence[ChunkKey]) -> None:
        """Chunks a save is about to store: told to the scheduler with this step's output."""
        with self._events_lock:
            self._events.stored.extend(keys)

    def _on_event(self, event: ChunkEvent) -> None:
        if event.kind == "stored":
            self._announce(event.keys)
            return
        with self._events_lock:
            self._events.dropped.extend(event.keys)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        reports = self._loader.reports() if self._loader is not None else []
        with self._events_lock:
            self._events.loads.extend(reports)
            if not self._events.stored and not self._events.dropped and not self._events.loads:
                return None
            events, self._events = self._events, KvtierWorkerMetadata()
        return events

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = self._loader.finished() if self._loader is not None else set()
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._loader.failed_blocks() if self._loader is not None else set()

    def shutdown(self) -> None:
        if self._feed is not None:
            self._feed.close()
        if self._loader is not None:
            self._loader.close()
        self._saver.close()
        shared_stores.release(self._config)
