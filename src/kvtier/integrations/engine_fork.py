"""The engine core forked from the API server, not spawned, when the model runs inside it.

vLLM on CPU starts its engine core with multiprocessing's *spawn*: a fresh interpreter that
imports torch and vLLM again before it can load the model. Off CPU vLLM forks it (its default,
unless CUDA is already initialized); forking is unsafe for a process that holds OpenMP threads,
but the API server holds none: it imports torch and never computes with it, and its own threads
(ZMQ's, asyncio's) are not used in the child. Measured on a 2-core EPYC, forked: the server
answered 28.5-30.7 s after start against 42.2-43.2 s spawned, computing the same.

So in the one-process layout (:mod:`kvtier.integrations.engine_layout`), where kvtier knows the
engine's cores, :func:`fork_engine_core` makes vLLM fork the engine core, which binds itself to
those cores before torch starts a thread there. A worker process the engine core may start
(vLLM's own layout) is still spawned: that path is left as vLLM has it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from typing import Any


class ForkContext:
    """multiprocessing's fork context, whose processes first bind themselves to ``cores``."""

    def __init__(self, cores: set[int]):
        self._fork = multiprocessing.get_context("fork")
        self._cores = cores

    def Process(self, target: Callable[..., Any], **kwargs: Any) -> Any:
        cores = self._cores

        def bound(*args: Any, **kw: Any) -> Any:
            os.sched_setaffinity(0, cores)
            listed = ", ".join(str(c) for c in sorted(cores))
            print(
                f"kvtier: the engine core computes on cores [{listed}] (pid {os.getpid()}, "
                "forked from the API server)",
                file=sys.stderr,
                flush=True,
            )
            return target(*args, **kw)

        return self._fork.Process(target=bound, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fork, name)


def fork_engine_core(cores: set[int]) -> None:
    """Make vLLM fork its engine-core process, bound to ``cores`` (call before its launch)."""
    import vllm.v1.engine.utils as engine_utils

    context = ForkContext(cores)
    engine_utils.get_mp_context = lambda: context  # type: ignore[assignment]
