"""vLLM's OpenAI-compatible server as ``kvtier serve`` and the benchmarks start it:
``python -m kvtier.integrations.vllm_main --model ...`` takes the options of
``python -m vllm.entrypoints.openai.api_server`` and runs the same server, from vLLM's launcher
entry point (that module is deprecated, warns on every start and may go; ``vllm serve`` would
do, but the CPU build's CLI looks up a package named ``vllm`` and stops).

It imports nothing unless it is the main module: vLLM starts its engine core, and on CPU its
worker, with multiprocessing's *spawn*, and a spawned process imports its parent's main module
first. (Measured, 2-core EPYC: this start and the deprecated module's took the same time to
/health, A/B 0.996 over 4 pairs; the engine processes import mostly what they need anyway.)
"""

from __future__ import annotations

if __name__ == "__main__":
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
