"""A simulated engine for the hits-first scheduler: vLLM's own Scheduler and KV cache manager
(prefix caching on) in this process, no model, steps timed by a simulated clock (a step of n
tokens lasts FIXED_S + n x PER_TOKEN_S, plus PER_START_S for each request whose prefill begins
in it when the engine is made with ``start_s``), each step's sampled token made up."""

from __future__ import annotations

import hashlib
import itertools
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from kvtier.integrations.vllm.hits_first import HitsFirstScheduler

BLOCK = 16
FIXED_S = 0.05  # a step's fixed cost
PER_TOKEN_S = 0.003  # ~330 tokens/s of prefill, as a 2-core AVX2 host in fp32
BUDGET = 2048  # vLLM's max_num_batched_tokens on CPU
STEP_S = 0.5


def config(model: str, policy: str, extra: dict[str, Any] | None = None) -> VllmConfig:
    transfer = None
    if extra is not None:
        transfer = KVTransferConfig(
            kv_connector="KvtierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    return VllmConfig(
        model_config=ModelConfig(model=model, dtype="float32", max_model_len=8192),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=BUDGET,
            max_num_seqs=64,
            max_model_len=8192,
            policy=policy,  # type: ignore[arg-type]
            is_encoder_decoder=False,
        ),
        kv_transfer_config=transfer,
    )


def scheduler(
    model: str, hits_first: bool, extra: dict[str, Any] | None = None, num_blocks: int = 4000
) -> Scheduler:
    vllm_config = config(model, "priority" if hits_first else "fcfs", extra)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)],
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    cls = HitsFirstScheduler if hits_first else Scheduler
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(vllm_config),
        log_stats=False,
        block_size=BLOCK,
    )


@dataclass
class Engine:
    """A scheduler and a simulated clock: each step lasts FIXED_S + tokens x PER_TOKEN_S."""

    sched: Scheduler
    now: float = 0.0
    first_token: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    steps: list[tuple[int, int]] = field(default_factory=list)  # (tokens, requests present)
    loaded: set[str] = field(default_factory=set)  # background loads to report done
    ids: Iterator[int] = field(default_factory=itertools.count)
    start_s: float = 0.0  # what a request's first prefill step adds (a hit's load)
    fixed_s: float = FIXED_S  # what every step costs

    def __post_init__(self) -> None:
        init_none_hash(digest)
        self.hasher = get_request_block_hasher(BLOCK, digest)
        if isinstance(self.sched, HitsFirstScheduler):
            self.sched.clock = lambda: self.now  # the step model learns the simulated speed
            epoch = self.sched._epoch
            self.sched.wall = lambda: epoch + self.now  # arrival times' clock

    def add(self, tokens: list[int], name: str | None = None, max_tokens: int = 1) -> str:
        req_id = name or f"r{next(self.ids)}"
        epoch = getattr(self.sched, "_epoch", 0.0)
        request = Request(
            req_id,
            tokens,
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            None,
            arrival_time=epoch + self.now,
            block_hasher=self.hasher,
        )
        self.sched.add_request(request)
        self.arrived[req_id] = self.now
        return req_id

    def step(self) -> int:
        present = len(self.sched.running) + len(self.sched.waiting)
        out = self.sched.schedule()
        tokens = int(out.total_num_scheduled_tokens)
        self.steps.append((tokens, present))
        starts = len(out.scheduled_new_reqs)
        self.now += self.fixed_s + PER_TOKEN_S * tokens + self.start_s * starts if tokens else 0.01
        sampled: list[list[int]] = []
        ids = list(out.num_scheduled_tokens)
        for req_id in ids:
            request = self.sched.requests[req_id]
            done = request.num_computed_tokens >= request.num_prompt_tokens
            sampled.append([7] if done else [])
            if done and req_id not in self.first_token:
                self.first_token[req_id] = self.now
        loaded, self.loaded = self.loaded, set()
        # The worker gathers finished requests' saves in the step that lists them: their
        # blocks are free after it (as the connector's worker reports them).
        released = set(getattr(out.kv_connector_metadata, "releases", None) or ())
        transfers = KVConnectorOutput(
            finished_recving=loaded or None, finished_sending=released or None
        )
        self.sched.update_from_output(
            out,
            ModelRunnerOutput(
                req_ids=ids,
                req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=sampled,
                kv_connector_output=transfers if loaded or released else None,
            ),
        )
        return tokens

    def start(self, req_id: str, steps: int = 1) -> None:
        """Steps until ``req_id`` has run ``steps`` steps (an idle engine first waits a
        moment for the companions of a cold prompt)."""
        for _ in range(100):
            if self.sched.requests[req_id].num_computed_tokens:
                break
            self.step()
        for _ in range(steps - 1):
            self.step()
        assert self.sched.requests[req_id].num_computed_tokens, "it never started"

    def run(self, until: float | None = None) -> None:
        """Steps until nothing is left (or the clock passes ``until``)."""
        for _ in range(5000):  # a stalled scheduler fails the test instead of hanging it
            past = until is not None and self.now >= until
            if past or not self.sched.has_unfinished_requests():
                return
            self.step()
        raise AssertionError(f"still unfinished after 5000 steps: {list(self.sched.requests)}")

    def ttft(self, req_id: str) -> float:
        return self.first_token[req_id] - self.arrived[req_id]


def digest(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value)).digest()


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 49000 + 100 for i in range(n)]
