"""The connector's scheduler side, fed with vLLM's own Request and SchedulerOutput objects: a
store, a scheduler side over it, requests and the scheduler outputs of their steps (for
tests/unit/test_connector_scheduler.py and test_connector_saves.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request

from kvtier.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.factory import open_store
from kvtier.integrations.vllm.context import ConnectorContext, ConnectorOptions
from kvtier.integrations.vllm.scheduler import SchedulerSide
from kvtier.store import TieredStore

from kvhelpers import CHUNK_TOKENS, SHAPE

BLOCK = 8  # vLLM's block size here: two blocks to a chunk
TAIL_SHAPE = (*SHAPE[:2], BLOCK, *SHAPE[3:])  # a one-block tail


CONFIGS: dict[int, StoreConfig] = {}  # id(store) -> its configuration (connector_store)


def side(store: TieredStore, loads: str = "auto", write_through: bool = False) -> SchedulerSide:
    """A scheduler side whose worker runs in another process (vLLM's own layout); with
    ``write_through``, saves go as a prompt is computed (they wait otherwise)."""
    options = ConnectorOptions(loads=loads, write_through=write_through)
    config = CONFIGS[id(store)]
    ctx = ConnectorContext(options, config, BLOCK, CHUNK_TOKENS, "m", "r1", "float16", store)
    return SchedulerSide(ctx, lambda: [])


def request(
    req_id: str, tokens: list[int], salt: str | None = None, max_tokens: int = 1
) -> Request:
    params = SamplingParams(max_tokens=max_tokens)
    return Request(req_id, tokens, params, None, cache_salt=salt)


def new(req: Request, blocks: list[int], computed: int) -> NewRequestData:
    req.num_computed_tokens = computed
    return NewRequestData.from_request(req, (blocks,))


def output(
    new_reqs: list[NewRequestData] = [],  # noqa: B006 (never mutated)
    cached: CachedRequestData | None = None,
    scheduled: dict[str, int] | None = None,
) -> SchedulerOutput:
    scheduled = scheduled or {}
    return SchedulerOutput(
        scheduled_new_reqs=new_reqs,
        scheduled_cached_reqs=cached or CachedRequestData.make_empty(),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )


def cached(
    req_id: str, blocks: list[int] | None, computed: int, resumed: bool
) -> CachedRequestData:
    return CachedRequestData(
        req_ids=[req_id],
        resumed_req_ids={req_id} if resumed else set(),
        new_token_ids=[[]],
        all_token_ids={},
        new_block_ids=[(blocks,) if blocks is not None else None],
        num_computed_tokens=[computed],
        num_output_tokens=[0],
    )


def blocks_for(tokens: int, first: int = 0) -> list[int]:
    return list(range(first, first + -(-tokens // BLOCK)))


def connector_store(tmp_path: Path) -> Iterator[TieredStore]:
    """DRAM over disk, as ``kvtier serve`` has them."""
    config = StoreConfig(
        chunk_tokens=CHUNK_TOKENS,
        tiers=(
            MemoryTierConfig(capacity=1 << 24, prefault=False),
            DiskTierConfig(path=str(tmp_path / "disk"), capacity=1 << 26, fsync=False),
        ),
    )
    with open_store(config) as opened:
        CONFIGS[id(opened)] = config
        yield opened
        del CONFIGS[id(opened)]
