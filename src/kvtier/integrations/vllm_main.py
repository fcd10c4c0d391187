"""vLLM's OpenAI-compatible server as ``kvtier serve`` and the benchmarks start it:
``python -m kvtier.integrations.vllm_main --model ...`` takes the options of
``python -m vllm.entrypoints.openai.api_server`` and runs the same server, from vLLM's launcher
entry point (that module is deprecated, warns on every start and may go; ``vllm serve`` would
do, but the CPU build's CLI looks up a package named ``vllm`` and stops).

It imports nothing unless it is the main module: vLLM starts its processes on CPU with
multiprocessing's *spawn*, and a spawned process imports its parent's main module first (as
``__mp_main__``). (Measured, 2-core EPYC: this start and the deprecated module's took the same
time to /health, A/B 0.996 over 4 pairs.)

When the model runs inside the engine core (``KVTIER_ENGINE_CORES`` set, see
:mod:`kvtier.integrations.engine_layout`), the engine core is forked instead
(:mod:`kvtier.integrations.engine_fork`) and binds itself to those cores; the API server stays
free to answer on any core (`/health` and the router's polls must not queue behind the model's
threads).
"""

from __future__ import annotations

if __name__ == "__main__":
    import os

    _cores = os.environ.get("KVTIER_ENGINE_CORES")
    if _cores:  # the engine core says where it computes (a line Server.cores() reads)
        from kvtier.integrations.engine_fork import fork_engine_core

        fork_engine_core({int(c) for c in _cores.split(",")})

    from vllm.entrypoints.launchers.api_server.entry import main

    main()
