"""kvtier's own threads: writers run only on cores nothing else wants, loads between them and
the engine; the thread that asks is the only one changed."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from kvtier.threads import background_priority, load_priority


def _in_thread(setup: Callable[[], None]) -> tuple[int, int]:
    """(scheduling policy, nice value) of a thread after ``setup`` ran in it."""
    got: list[tuple[int, int]] = []

    def run() -> None:
        setup()
        tid = threading.get_native_id()
        got.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, tid)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return got[0]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_writers_run_idle_loads_nice_and_the_caller_alone_changes() -> None:
    before = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
    assert _in_thread(background_priority)[0] == os.SCHED_IDLE
    policy, nice = _in_thread(load_priority)
    assert policy == os.SCHED_OTHER and nice == 5  # lowering one's priority is always allowed
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == before
