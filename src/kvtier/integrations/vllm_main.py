"""vLLM's OpenAI-compatible server as ``kvtier serve`` and the benchmarks start it:
``python -m kvtier.integrations.vllm_main --model ...`` takes the options of
``python -m vllm.entrypoints.openai.api_server`` and runs the same server, from vLLM's launcher
entry point (that module is deprecated, warns on every start and may go; ``vllm serve`` would
do, but the CPU build's CLI looks up a package named ``vllm`` and stops).

It imports nothing unless it is the main module: vLLM starts its engine core, and on CPU its
worker, with multiprocessing's *spawn*, and a spawned process imports its parent's main module
first (as ``__mp_main__``). (Measured, 2-core EPYC: this start and the deprecated module's took
the same time to /health, A/B 0.996 over 4 pairs; the engine processes import mostly what they
need anyway.)

That first import is also where the engine core takes its cores when the worker computes
inside it (``KVTIER_ENGINE_CORES``, see :mod:`kvtier.integrations.engine_layout`): the engine
core binds itself before torch starts a thread, as vLLM binds a worker process, and the API
server stays free to answer on any core (`/health` and the router's polls must not queue
behind the model's threads).
"""

from __future__ import annotations

if __name__ == "__mp_main__":  # a process vLLM spawned: the engine core
    import os

    _cores = os.environ.get("KVTIER_ENGINE_CORES")
    if _cores:
        os.sched_setaffinity(0, {int(c) for c in _cores.split(",")})

if __name__ == "__main__":
    import os
    import sys

    _cores = os.environ.get("KVTIER_ENGINE_CORES")
    if _cores:
        print(f"kvtier: the engine core computes on cores [{_cores.replace(',', ', ')}]",
              file=sys.stderr, flush=True)  # fmt: skip

    from vllm.entrypoints.launchers.api_server.entry import main

    main()
