"""A vLLM engine with the kvtier connector, driven by a plan; run as a separate process.

    python vllm_worker.py '<kvtier config JSON or null>' '<plan JSON>' [OPTION...]

Plan steps: {"seed": S, "tokens": N, "salt": str|null, "max_tokens": M} generates greedily
from a deterministic prompt and prints {"step", "tokens", "seconds", "cached", "stats"} as one
JSON line ("cached": prompt tokens vLLM did not compute, from its prefix cache or kvtier);
{"pause": "label"} prints {"pause": label} and waits for a line on stdin (the test acts in
between, e.g. stops Redis). Engines use float32 so that "identical output" is exact.

    python vllm_worker.py --zygote SOCKET

imports vLLM once and forks each later run from there (tests/zygote.py): a run started while
``KVTIER_TEST_ZYGOTE`` names that socket is forked by it, and this process only relays.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import zygote

if __name__ == "__main__" and os.environ.get(zygote.ENV) and sys.argv[1:2] != ["--zygote"]:
    sys.exit(zygote.client(os.environ[zygote.ENV], sys.argv[1:]))  # before vLLM is imported

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig

from kvtier.integrations import shared_stores
from kvtier.integrations.model import prepare_default_model

MARK = "KVTIER-RESULT "  # vLLM prints to stdout too: our lines carry this mark


def prompt(seed: int, n: int) -> list[int]:
    ids: list[int] = np.random.default_rng(seed).integers(100, 40000, size=n).tolist()
    return ids


def request_of(step: dict[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt_token_ids": prompt(step["seed"], step["tokens"])}
    if step.get("salt") is not None:
        request["cache_salt"] = step["salt"]
    return request


def params_of(step: dict[str, Any]) -> SamplingParams:
    return SamplingParams(max_tokens=step.get("max_tokens", 4), temperature=0)


def stats() -> dict[str, object]:
    stores = shared_stores.open_stores()
    return stores[0].stats().as_dict() if stores else {}


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    plan = json.loads(argv[1])
    options = argv[2:]
    kwargs: dict[str, object] = {"max_model_len": 4096}
    for option in options:
        if option.startswith("gpu-blocks="):
            blocks = int(option.split("=")[1])
            kwargs.update(num_gpu_blocks_override=blocks, max_model_len=128 * (blocks - 1))
        elif option != "prefix-caching":
            raise SystemExit(f"vllm_worker.py: unknown option {option!r}")
    if config is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvtierConnector",
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=config,
        )
    llm = LLM(
        model=str(prepare_default_model(dtype="float32")),  # the fp32 checkpoint: no conversion
        enforce_eager=True,
        dtype="float32",
        enable_prefix_caching="prefix-caching" in options,
        **kwargs,
    )
    for i, step in enumerate(plan):
        if "pause" in step:
            print(MARK + json.dumps({"pause": step["pause"]}), flush=True)
            sys.stdin.readline()
            continue
        if "abandon" in step:
            engine = llm.llm_engine
            given = step["abandon"]
            engine.add_request(f"abandon-{i}", request_of(given), params_of(given))
            engine.step()  # scheduled: a hit from disk starts loading
            engine.abort_request([f"abandon-{i}"])
            print(MARK + json.dumps({"step": i, "abandoned": True}), flush=True)
            continue
        request, params = request_of(step), params_of(step)
        start = time.perf_counter()
        out = llm.generate([request], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - start
        print(
            MARK
            + json.dumps(
                {
                    "step": i,
                    "tokens": list(out.outputs[0].token_ids),
                    "seconds": seconds,
                    "cached": out.num_cached_tokens,
                    "stats": stats(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zygote"]:
        zygote.serve(sys.argv[2], main)
    main(sys.argv[1:])
