"""Write-behind: a bounded queue and one worker thread per lower tier.

``put`` writes the top tier inline and hands the lower tiers' copies to these queues, so a
slow or dead tier never blocks inference. When a queue is full the write is dropped and
counted; the chunk is still in the tiers above, and at worst is recomputed later.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

from kvtier.keys import ChunkKey
from kvtier.threads import background_priority
from kvtier.tiers.base import Blob

log = logging.getLogger("kvtier")

WriteBatch = list[tuple[ChunkKey, Blob]]
_BATCH_CHUNKS = 32
_BATCH_BYTES = 64 << 20


class WriteBehind:
    def __init__(self, name: str, write: Callable[[WriteBatch], None], max_queued: int):
        if max_queued <= 0:
            raise ValueError(f"write queue size must be positive, got {max_queued}")
        self.name = name
        self._write = write
        self._max = max_queued
        self._queue: deque[tuple[ChunkKey, Blob]] = deque()
        self._busy = 0  # jobs taken by the worker and not finished
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kvtier-write-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[tuple[ChunkKey, Blob]]) -> int:
        """Queue what fits; return how many were dropped because the queue was full."""
        with self._cond:
            if self._closed:
                return len(items)
            room = self._max - len(self._queue)
            taken = list(items[: max(room, 0)])
            self._queue.extend(taken)
            if taken:
                self._cond.notify()
        return len(items) - len(taken)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or dropped). False on timeout.

        Called from the worker itself (an event listener runs there) it cannot wait for its
        own batch, and returns False at once instead of deadlocking.
        """
        if threading.current_thread() is self._thread:
            return False
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (up to ``timeout``), then stop the worker."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self) -> WriteBatch | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if self._closed:
                return None
            batch: WriteBatch = []
            size = 0
            while self._queue and len(batch) < _BATCH_CHUNKS and size < _BATCH_BYTES:
                item = self._queue.popleft()
                batch.append(item)
                size += memoryview(item[1]).nbytes
            self._busy = len(batch)
            return batch

    def _run(self) -> None:
        background_priority()
        while (batch := self._take()) is not None:
            try:
                self._write(batch)
            except Exception:  # the writer handles tier errors; this is a bug guard
                log.exception("kvtier write-behind to %r failed", self.name)
            finally:
                with self._cond:
                    self._busy = 0
                    self._cond.notify_all()
