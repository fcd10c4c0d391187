"""The connector's worker side: the KV cache's tensors, and the loads and saves each step's
metadata lists.

Loads (:mod:`.loader`) copy each chunk once, from where kvtier holds it into the request's
blocks; a background load starts as soon as the step's metadata is bound, a step before the
forward pass that does not need it. Saves (:mod:`.saver`) gather the blocks straight into
encoded chunks, leaving checksums and tier writes to a background thread (with
``write_through``, every tier is written inline). What entered or left the worker's DRAM tier
and what each load read go back to the scheduler side with the step's output
(:class:`~.messages.KvtierWorkerMetadata`).
"""

from __future__ import annotations

import atexit
import math
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from kvtier import codec
from kvtier.config import MemoryTierConfig
from kvtier.errors import ConfigError
from kvtier.integrations import shared_stores
from kvtier.integrations.feed import EventFeed, store_feed
from kvtier.integrations.vllm.accounts import ConnectorMetrics
from kvtier.integrations.vllm.chunk_pool import ChunkPool
from kvtier.integrations.vllm.context import ConnectorContext, log
from kvtier.integrations.vllm.loader import Loader
from kvtier.integrations.vllm.messages import (
    KvtierConnectorMetadata,
    KvtierWorkerMetadata,
    SaveSpec,
)
from kvtier.integrations.vllm.metrics import KvtierStats
from kvtier.integrations.vllm.paged import TORCH_DTYPES, block_view
from kvtier.integrations.vllm.saver import Saver
from kvtier.keys import ChunkKey
from kvtier.stats import ChunkEvent
from kvtier.store import TieredStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig


_workers: weakref.WeakSet[WorkerSide] = weakref.WeakSet()  # this process's worker sides


def in_process_saves() -> list[Saver]:
    """The savers of this process's worker sides."""
    return [worker.saver for worker in list(_workers)]


# Saves that finished requests left for a step of their engine (see SchedulerSide.finished):
# each source hands them over with the store they go to.
PendingSaves = Callable[[], tuple[TieredStore, list[SaveSpec]]]
_pending: list[weakref.WeakMethod[PendingSaves]] = []


def hand_over_pending(source: PendingSaves) -> None:
    """Register a scheduler side's :meth:`take_pending` with :func:`flush_all`."""
    _pending.append(weakref.WeakMethod(source))  # type: ignore[arg-type]


def flush_all(timeout: float | None = None) -> None:
    """Wait for every connector's pending saves and the stores' lower-tier writes; first,
    gather the saves that finished requests left for a step that has not come (an engine
    run in-process by ``vllm.LLM`` steps only while requests are unfinished). Call it when
    no step runs: after ``LLM.generate`` returns, or at exit."""
    for ref in list(_pending):
        take = ref()
        if take is None:
            _pending.remove(ref)
            continue
        store, specs = take()
        worker = next((w for w in list(_workers) if w.ctx.store is store), None)
        if worker is not None and specs:
            worker.saver.save(specs)
    for saver in in_process_saves():
        saver.wait()
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


def can_hold(store: TieredStore, nbytes: int) -> bool:
    """Whether some tier of ``store`` can hold a chunk of ``nbytes`` (a tier without a bound
    of its own, or one that cannot say, is taken to)."""
    bounds = [t.get("capacity_bytes", -1) for t in store.tier_states().values()]
    return not all(b is not None and 0 <= b < nbytes for b in bounds)


def _layer_index(name: str) -> tuple[int, str]:
    match = re.search(r"layers\.(\d+)\.", name)
    return (int(match.group(1)) if match else 0, name)


class WorkerSide:
    """The connector's worker-side calls, for :class:`~.connector.KvtierConnector`."""

    def __init__(self, ctx: ConnectorContext, vllm_config: VllmConfig):
        self.ctx = ctx
        self._vllm_config = vllm_config
        self._metrics = ConnectorMetrics(None)
        self._layers: list[torch.Tensor] = []
        self._loader: Loader | None = None  # made once the KV cache is known
        self._feed: EventFeed | None = None
        self._pool = ChunkPool()
        self.saver = Saver(
            ctx.store,
            self._pool,
            ctx.namespace,
            ctx.block_size,
            ctx.kv_dtype,
            ctx.options.write_through,
            self._announce,
        )
        self._events_lock = threading.Lock()
        self._events = KvtierWorkerMetadata()
        self._releasing: list[tuple[list[str], Future[None] | None]] = []  # see save()
        _workers.add(self)
        top = ctx.store.tiers[0].name
        ctx.store.subscribe(lambda e: self._on_event(e) if e.tier == top else None)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's ``register_kv_caches``: every layer's cache, viewed as blocks."""
        ctx = self.ctx
        model = self._vllm_config.model_config
        heads = model.get_num_kv_heads(self._vllm_config.parallel_config)
        head_dim = model.get_head_size()
        ordered = [kv_caches[name] for name in sorted(kv_caches, key=_layer_index)]
        try:
            self._layers = [block_view(t, heads, head_dim, ctx.packed) for t in ordered]
        except ValueError as exc:
            raise ConfigError(f"kvtier cannot use this KV cache: {exc}") from None
        if self._layers[0].block_size != ctx.block_size:
            raise ConfigError(
                f"KV cache blocks hold {self._layers[0].block_size} tokens, vLLM's block size"
                f" is {ctx.block_size}"
            )
        if TORCH_DTYPES.get(ordered[0].dtype) != ctx.kv_dtype:
            raise ConfigError(
                f"KV cache is {ordered[0].dtype}, the configuration said {ctx.kv_dtype}"
            )
        self._loader = Loader(
            ctx.store, self._layers, ctx.chunk, ctx.namespace, self.saver.wait, ctx.packed
        )
        need = codec.HEADER_BYTES + self._loader.chunk_bytes()
        saves = can_hold(ctx.store, need)
        if not saves:
            # Every save would gather chunks no tier keeps, into new memory (the pool holds
            # none either), on the engine's thread: a 5,000-token prompt's 20 chunks took
            # 99 ms a request on a 2-core Xeon (kvtier serve --dram 1MiB --disk none).
            log.warning(
                "kvtier: no tier can hold a chunk of this model (%.1f MB); nothing is saved",
                need / 1e6,
            )
        self.saver.bind(self._layers, self._loader.chunk_shape, saves, ctx.kv_runs)
        shape = self._loader.chunk_shape()
        top = ctx.config.tiers[0] if ctx.config.tiers else None
        fill = top.capacity if isinstance(top, MemoryTierConfig) and top.prefault else 0
        self._pool.reserve(ctx.kv_dtype, shape, fill, ctx.kv_runs)  # the DRAM tier's first fill
        ctx.store.use_blanks(self._pool.spare)  # promotions from disk/Redis too
        ctx.store.warm()  # reader threads and buffers, not in the first hit
        self._loader.warm()
        if ctx.options.feed_port is not None:
            self._start_feed(ctx.options.feed_port, shape)

    def _start_feed(self, port: int, chunk_shape: tuple[int, ...]) -> None:
        """Publish what this worker's store holds, for ``kvtier router`` (see integrations.feed)."""
        ctx = self.ctx
        per_token = math.prod(chunk_shape) * self._layers[0].k.element_size() // ctx.chunk
        feed = store_feed(
            ctx.store,
            ctx.config,
            ctx.namespace(None),
            ctx.block_size,
            per_token,
            ctx.options.kv_events,
            ctx.options.engine_dtype,
            ctx.options.scheduling,
            ctx.granule,
        )
        self._feed = feed if feed.start("127.0.0.1", port) else None

    def bound(self, meta: KvtierConnectorMetadata) -> None:
        """The step's metadata: background loads start now, not after the forward pass."""
        if self._loader is not None:
            for spec in meta.loads:
                if spec.background:
                    self._loader.start(spec)
            meta.loads = [s for s in meta.loads if not s.background]

    def load(self, meta: KvtierConnectorMetadata) -> None:
        """Before the forward pass: the loads it needs, and prefetches for waiting requests."""
        # Sized like a load's reads: each chunk read straight into its DRAM copy, a quantized
        # one decoded there (an unsized prefetch read each chunk into new bytes, then copied
        # it; a quantized one it decoded twice, to verify and to promote it).
        sized = self._loader.chunk_bytes() if self._loader is not None else None
        for tokens, salt in meta.prefetches:
            self.ctx.store.prefetch(tokens, self.ctx.namespace(salt), sized)
        if self._loader is not None:
            for spec in meta.loads:
                self._loader.load(spec)

    def save(self, meta: KvtierConnectorMetadata) -> None:
        """After the forward pass: the step's saves. The blocks of the finished requests
        among them (``meta.releases``) are released once the saves are stored (even if one
        failed: a failed save is a future miss). Gathered, the blocks are no longer needed;
        but vLLM steps an engine with no request left only while some request's blocks are
        held, and the step after the saves are stored reports them (their time, the tiers'
        counters): an idle server's /metrics would otherwise miss its last saves."""
        try:
            self.saver.save(meta.saves)
        finally:
            if meta.releases:
                self._releasing.append((list(meta.releases), self.saver.last_write()))

    def released(self) -> set[str]:
        """Finished requests whose saves are stored, since the last call."""
        out: set[str] = set()
        while self._releasing and (self._releasing[0][1] is None or self._releasing[0][1].done()):
            out.update(self._releasing.pop(0)[0])
        return out

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

    def report(self) -> KvtierWorkerMetadata | None:
        """What the scheduler side hears with this step's output (None: nothing new)."""
        reports = self._loader.reports() if self._loader is not None else []
        with self._events_lock:
            self._events.loads.extend(reports)
            if not self._events.stored and not self._events.dropped and not self._events.loads:
                return None
            events, self._events = self._events, KvtierWorkerMetadata()
        return events

    def finished_loads(self) -> set[str]:
        return self._loader.finished() if self._loader is not None else set()

    def failed_blocks(self) -> set[int]:
        return self._loader.failed_blocks() if self._loader is not None else set()

    def stats(self) -> KvtierStats | None:
        return self._metrics.worker_stats(self.ctx.store, self.saver.took())

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
        if self._loader is not None:
            self._loader.close()
        self.saver.close()
