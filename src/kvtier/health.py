"""Tier health: a failing tier is skipped for a while, then tried again.

The first failure of an outage logs one warning; calls made while the tier is marked down are
skipped without touching it (a miss, or a dropped write). After ``retry_after_s`` the next
call tries the tier again; each further failure doubles the wait up to ``max_retry_s``; the
first success logs that the tier recovered and resets the wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kvtier")


class TierHealth:
    def __init__(
        self,
        name: str,
        retry_after_s: float = 1.0,
        max_retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self._retry_after = retry_after_s
        self._max_retry = max_retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until: float | None = None
        self._wait = retry_after_s

    def available(self) -> bool:
        until = self._down_until
        return until is None or self._clock() >= until

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            now = self._clock()
            if self._down_until is None:
                log.warning(
                    "kvtier tier %r failed (%s: %s); treating it as a miss and retrying in %.1fs",
                    self.name,
                    type(exc).__name__,
                    exc,
                    self._wait,
                )
            elif now >= self._down_until:  # a retry failed: wait longer next time
                self._wait = min(self._wait * 2, self._max_retry)
            else:  # a call that started before the tier was marked down: same outage
                return
            self._down_until = now + self._wait

    def succeeded(self) -> None:
        if self._down_until is None:
            return
        with self._lock:
            if self._down_until is not None:
                log.warning("kvtier tier %r recovered", self.name)
            self._down_until = None
            self._wait = self._retry_after
