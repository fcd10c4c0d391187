"""One engine process of ``kvtier bench ttft``'s no-reuse overhead: ``python -m
kvtier.bench.ttft_worker '<job JSON>'``. Prints one JSON line (after the mark) with the
measured seconds.

A job names the connector (``none``, or ``kvtier`` with a store configuration) and sends
``rounds`` batches of ``batch`` distinct prompts of ``tokens`` tokens in ``dtype`` (the
engine's), reporting the time of each (throughput: nothing is ever reused); with ``stats``,
vLLM's statistics are on, as in a server, and kvtier's metrics with them. With ``paired``
(kvtier only) every round is run twice in the same engine, the connector working in one and
bypassed in the other (every method returns at once, its metrics too, as if no connector were
configured), in alternating order; the bypassed times come back as ``bypassed``. Identical
engine processes differ from each other by several percent here, while rounds within one engine
agree to about one: pairs in one engine measure kvtier's own cost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MARK = "KVTIER-TTFT "


def prompt(seed: int, tokens: int) -> list[int]:
    import numpy as np

    ids: list[int] = np.random.default_rng(seed).integers(100, 40000, size=tokens).tolist()
    return ids


def build_llm(job: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from kvtier.integrations.model import prepare_default_model

    kwargs: dict[str, Any] = {}
    if job["connector"] == "kvtier":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvtierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=job["store"],
        )
    dtype = job.get("dtype", "bfloat16")
    return LLM(
        model=job.get("model") or str(prepare_default_model(dtype=dtype)),
        dtype=dtype,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=8192,
        # As a server runs: vLLM's statistics on, and with them kvtier's metrics.
        disable_log_stats=not job.get("stats", False),
        **kwargs,
    )


def main() -> None:
    # Engine and worker in this one process; 2 GiB of RAM for vLLM's own KV cache.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    job = json.loads(sys.argv[1])
    from vllm import SamplingParams

    llm = build_llm(job)
    one = SamplingParams(max_tokens=1, temperature=0)
    # A short unrelated request first: a fresh engine's first forward pass carries one-time
    # costs that are not what is being measured.
    llm.generate([{"prompt_token_ids": prompt(999_999, 64)}], one, use_tqdm=False)
    seconds: list[float] = []
    bypassed: list[float] = []
    size, sixteen = job["batch"], SamplingParams(max_tokens=16, temperature=0)
    batches = iter(range(10_000, 10**9, size))

    def timed_round(bypass: bool) -> float:
        first = next(batches)
        seeds = range(first, first + size)
        prompts = [{"prompt_token_ids": prompt(s, job["tokens"])} for s in seeds]
        with _bypassed(bypass):
            start = time.perf_counter()
            llm.generate(prompts, sixteen, use_tqdm=False)
            return time.perf_counter() - start

    paired = bool(job.get("paired"))
    for r in range(-1, job.get("rounds", 1)):  # round -1 warms up, untimed
        order = (False, True) if r % 2 == 0 else (True, False)
        for bypass in order if paired else (False,):
            took = timed_round(bypass)
            if r >= 0:
                (bypassed if bypass else seconds).append(took)
    if job["connector"] == "kvtier":
        from kvtier.integrations.vllm import flush_all

        flush_all()  # what later processes read must be written before this one exits
    print(MARK + json.dumps({"seconds": seconds, "bypassed": bypassed}), flush=True)


@contextmanager
def _bypassed(bypass: bool) -> Iterator[None]:
    """kvtier's connector doing nothing at all (for the rounds it is off in a paired job)."""
    if not bypass:
        yield
        return
    from kvtier.integrations.vllm import KvtierConnector
    from kvtier.integrations.vllm.messages import KvtierConnectorMetadata

    idle: dict[str, Any] = {
        "get_num_new_matched_tokens": lambda self, request, computed: (0, False),
        "update_state_after_alloc": lambda self, *a, **k: None,
        "build_connector_meta": lambda self, out: KvtierConnectorMetadata(),
        "request_finished": lambda self, request, block_ids: (False, None),
        "start_load_kv": lambda self, *a, **k: None,
        "wait_for_save": lambda self: None,
        "get_kv_connector_stats": lambda self: None,  # no connector, no connector metrics
    }
    saved = {name: getattr(KvtierConnector, name) for name in idle}
    for name, fn in idle.items():
        setattr(KvtierConnector, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(KvtierConnector, name, fn)


if __name__ == "__main__":
    main()
