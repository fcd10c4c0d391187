"""How kvtier's own threads share the machine with the engine: which cores they may use and
how urgently they run. Passed as thread initializers; nothing here is global state."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import suppress

_BACKGROUND_NICE = 10
_LOAD_NICE = 5


def any_core() -> None:
    """Let the calling thread run on every core this process may use.

    An engine that binds its compute threads to cores (vLLM on CPU pins the thread that
    loads the model, and so every thread it starts later, to one core) would otherwise keep
    kvtier's reader threads on that one core, queued behind each other and the engine, while
    other cores sit idle: disk reads in a served engine ran at a quarter of the device's speed
    that way.
    """
    if hasattr(os, "sched_setaffinity"):
        with suppress(OSError):  # the kernel keeps only the cores this process's cpuset has
            os.sched_setaffinity(0, range(os.cpu_count() or 1))


def background_priority() -> None:
    """Run the calling thread only on a core nothing else wants (Linux ``SCHED_IDLE``; nice
    10 where that is refused). Threads have their own scheduling policy on Linux.

    Lower-tier writes and the sealing of saved chunks are never urgent; on a machine whose
    cores the engine keeps busy they should take what the engine leaves, not slow down
    inference. At nice 10 a writer still took a core from one of the engine's two compute
    threads now and then, and the other waited for it at the next barrier: the no-reuse
    overhead of kvtier (bench ttft's paired rounds, 2-core Xeon, bf16) was +4.4% raw and
    +7.3% int8 at nice 10, +2.1% and +5.2% idle. Between engine steps, and whenever the
    engine waits for a save, a core is free. A lookup that needs a chunk still being
    written waits for it, which frees a core for the writer.
    """
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        with suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
    _nice(_BACKGROUND_NICE)


def load_priority() -> None:
    """A priority between the engine's and the writers', for reads and loads that run while
    the engine computes other requests (a request waits for them, so they are not idle work:
    measured with a stream decoding beside an 8,000-token disk load, nice 10 kept the stream's
    steps as they were and made the load 3x longer, nice 0 left the stream's steps up to 4x
    longer; nice 5 is between)."""
    _nice(_LOAD_NICE)


def _nice(value: int) -> None:
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)


def on_each(pool: Executor, threads: int, run: Callable[[], object]) -> None:
    """``run()`` once on each of ``pool``'s ``threads`` threads (starting them): each task
    waits for the others before it ends, so no thread takes two. Sets up per-thread state
    (a read buffer) as a server starts rather than in its first request."""
    together = threading.Barrier(threads, timeout=5)

    def one(_: int) -> None:
        run()
        with suppress(threading.BrokenBarrierError):
            together.wait()

    list(pool.map(one, range(threads)))
