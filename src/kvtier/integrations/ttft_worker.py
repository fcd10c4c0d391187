"""One engine process of ``kvtier bench ttft``: ``python -m kvtier.integrations.ttft_worker
'<job JSON>'``. Prints one JSON line (after the mark) with the measured seconds.

A job names the connector (``none``, ``kvtier`` with a store configuration, or ``example``
with a directory), whether vLLM's prefix cache is on, and the requests to time: each is a
prompt (seed, length) sent with ``max_tokens=1``, so its latency is the time to first token.
A ``batch`` job sends ``rounds`` batches of distinct prompts and reports the time of each
(throughput).
"""

from __future__ import annotations

import json
import os
import sys
import time
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
    elif job["connector"] == "example":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": job["path"]},
        )
    return LLM(
        model=job.get("model") or str(prepare_default_model()),
        enforce_eager=True,
        enable_prefix_caching=job.get("prefix_cache", False),
        max_model_len=8192,
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
    if "batch" in job:  # rounds of distinct prompts: nothing is ever reused
        size, sixteen = job["batch"], SamplingParams(max_tokens=16, temperature=0)
        for r in range(-1, job.get("rounds", 1)):  # round -1 warms up, untimed
            seeds = range(10_000 + r * size, 10_000 + (r + 1) * size)
            prompts = [{"prompt_token_ids": prompt(s, job["tokens"])} for s in seeds]
            start = time.perf_counter()
            llm.generate(prompts, sixteen, use_tqdm=False)
            if r >= 0:
                seconds.append(time.perf_counter() - start)
    else:
        for seed, tokens in job["requests"]:
            request = {"prompt_token_ids": prompt(seed, tokens)}
            start = time.perf_counter()
            llm.generate([request], one, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
    if job["connector"] == "kvtier":
        from kvtier.integrations.vllm import flush_all

        flush_all()  # what later processes read must be written before this one exits
    print(MARK + json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
