"""Background promotions, and the bookkeeping that lets a reader wait for one in flight.

A reader that needs chunks a prefetch is already moving waits for it instead of reading the
same bytes from the slow tier a second time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kvtier.keys import ChunkKey


class Prefetcher:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-prefetch")
        self._moving: dict[ChunkKey, Future[int]] = {}
        self._lock = threading.Lock()

    def submit(self, keys: Sequence[ChunkKey], run: Callable[[], int]) -> Future[int]:
        """Run ``run`` (which moves ``keys``) in the background; readers of ``keys`` wait."""

        def tracked() -> int:
            try:
                return run()
            finally:
                with self._lock:
                    for key in keys:
                        if self._moving.get(key) is future:
                            del self._moving[key]

        with self._lock:
            future = self._pool.submit(tracked)
            for key in keys:
                self._moving[key] = future
        return future

    def wait_for(self, keys: Sequence[ChunkKey]) -> None:
        """Wait for the prefetches moving any of ``keys`` (they never raise for tier errors)."""
        with self._lock:
            pending = {id(f): f for k in keys if (f := self._moving.get(k)) is not None}
        for future in pending.values():
            future.exception()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
