"""vLLM's OpenAI-compatible server as ``kvtier serve`` and the benchmarks start it:
``python -m kvtier.integrations.vllm_main --model ...`` takes the options of
``python -m vllm.entrypoints.openai.api_server`` and runs the same server.

Why not vLLM's module itself: vLLM starts its engine core, and on CPU its worker, with
multiprocessing's *spawn*, and a spawned process first imports its parent's main module.
Started as ``python -m vllm.entrypoints.openai.api_server``, both re-imported the whole HTTP
server (FastAPI, the OpenAI client, the chat renderers): 9 s each on a 2-core EPYC, about a
quarter of a server's start (``PYTHONPROFILEIMPORTTIME=1 kvtier serve``). This module imports
nothing unless it is the main one, so those processes import only what they run. (``vllm
serve`` would do too, but the CPU build's CLI looks up a package named ``vllm`` and stops.)
"""

from __future__ import annotations

if __name__ == "__main__":
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
