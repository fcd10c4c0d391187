"""``KvtierConnector``, the class users name in ``--kv-transfer-config``: a front that hands
each of vLLM's calls to the side of the connector its role runs (:mod:`.scheduler` or
:mod:`.worker`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

from kvtier.integrations.vllm.context import ConnectorContext
from kvtier.integrations.vllm.messages import KvtierConnectorMetadata
from kvtier.integrations.vllm.metrics import KvtierPromMetrics, KvtierStats
from kvtier.integrations.vllm.scheduler import SchedulerSide
from kvtier.integrations.vllm.worker import WorkerSide, flush_all, in_process_saves

__all__ = ["KvtierConnector", "flush_all"]

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KvtierConnector(KVConnectorBase_V1):
    scheduler: SchedulerSide  # in the scheduler's connector only
    worker: WorkerSide  # in the worker's only

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._ctx = ConnectorContext.from_vllm(vllm_config)
        if role == KVConnectorRole.WORKER:
            self.worker = WorkerSide(self._ctx, vllm_config)
        else:
            self.scheduler = SchedulerSide(self._ctx, in_process_saves)

    # -- scheduler side (see .scheduler) ----------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self.scheduler.arrived(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler.matched(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        block_ids = list(blocks.get_block_ids()[0]) if num_external_tokens > 0 else []
        self.scheduler.allocated(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.step(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.worker_reported(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.finished(request, block_ids), None

    # -- both: metrics ----------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This interval's metrics: requests on the scheduler side, tiers on the worker's."""
        if self.role == KVConnectorRole.WORKER:
            return self.worker.stats()
        return self.scheduler.metrics.scheduler_stats()

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

    # -- worker side (see .worker) ----------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, KvtierConnectorMetadata):
            self.worker.bound(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        self.worker.load(meta)

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
        self.worker.save(meta)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.report()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.released() or None, self.worker.finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.failed_blocks()

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self.worker.close()
        self._ctx.release()
