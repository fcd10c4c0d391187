"""Requests on their way to the engine: counted where they arrive (vLLM's API server), read by
the scheduler (the engine core), so that an idle engine starts its first step once a burst's
requests are all in, not before and not later.

A burst's requests reach the API server together and the engine core some milliseconds apart
(each is parsed, templated and tokenized first). An engine that starts its step with the first
of them leaves the others queued until that step ends: measured through ``kvtier serve``
(Xeon, 2 cores, bf16), the first two requests of a burst of four reached the engine 6-11 ms
after they were made ready, the other two 146 ms after, the length of the step that had
started. A fixed wait would cost every lone request that wait too; the count costs a lone
request nothing (nothing else is on its way) and a burst only the time its last request takes
to come in.

The counters live in a memory file (``memfd``) that ``kvtier serve`` makes before it becomes
vLLM's API server; both processes open it by its ``/proc/PID/fd/N`` path
(``KVTIER_FRONT``), which ends with the server: nothing is left on disk. Two 64-bit counters:
completion requests received, and those answered with an error before any reached the
engine. The scheduler counts the requests it was given; what is left is on its way. A request
that got lost between the two (a client gone during tokenization) would count forever: the
scheduler stops waiting for it after its gather time and forgets it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping

FRONT_ENV = "KVTIER_FRONT"
_SIZE = 16
_RECEIVED, _REFUSED = 0, 8
# The paths whose POSTs become engine requests.
COUNTED = ("/v1/chat/completions", "/v1/completions")


def make_front(pid: int | None = None) -> tuple[int, str]:
    """A new memory file for the counters, inheritable across ``exec``: its descriptor and
    the path other processes open it by (valid while process ``pid``, default this one,
    holds it open)."""
    fd = os.memfd_create("kvtier-front", 0)
    os.ftruncate(fd, _SIZE)
    os.set_inheritable(fd, True)
    return fd, f"/proc/{pid or os.getpid()}/fd/{fd}"


class Front:
    """The counters, mapped: :meth:`received` and :meth:`refused` by the API server,
    :meth:`counts` by the scheduler."""

    def __init__(self, path: str):
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _SIZE)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Front | None:
        """The front ``kvtier serve`` made, or None (started otherwise, or already gone)."""
        path = env.get(FRONT_ENV)
        if not path:
            return None
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def _add(self, offset: int) -> None:
        # One API server process increments (its event loop): no other writer to race.
        (value,) = struct.unpack_from("<Q", self._map, offset)
        struct.pack_into("<Q", self._map, offset, value + 1)

    def received(self) -> None:
        self._add(_RECEIVED)

    def refused(self) -> None:
        self._add(_REFUSED)

    def counts(self) -> tuple[int, int]:
        """(received, refused) so far."""
        received, refused = struct.unpack_from("<QQ", self._map, 0)
        return int(received), int(refused)


class OnTheWay:
    """The scheduler's side: how many requests the API server received that the engine has
    not been given yet."""

    def __init__(self, front: Front):
        self.front = front
        self.given = 0
        self._correction = 0  # given up on (forget), or one request made several

    def pending(self) -> int:
        received, refused = self.front.counts()
        left = received - refused - self._correction - self.given
        if left < 0:  # one HTTP request made several engine requests (n > 1, a prompt list)
            self._correction += left
            left = 0
        return left

    def forget(self) -> None:
        """What is still counted as on its way is taken as lost (waited for long enough)."""
        self._correction += self.pending()
