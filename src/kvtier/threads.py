"""How kvtier's own threads share the machine with the engine: which cores they may use and
how urgently they run. Passed as thread initializers; nothing here is global state."""

from __future__ import annotations

import os
import threading
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
    """Lower the calling thread's CPU priority (Linux: threads have their own nice value).

    Lower-tier writes are never urgent; on a machine whose cores the engine keeps busy they
    should take what the engine leaves, not slow down inference.
    """
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
