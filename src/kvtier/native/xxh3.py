"""xxh3-64 of a chunk (its header's prefix, then its payload) without holding the GIL.

The ``xxhash`` package hashes with the GIL held: a 5.9 MB chunk takes 0.25-0.6 ms (in cache /
from DRAM on a 2-core Xeon), and a load verifying 20 chunks on four reader threads ran those
hashes one after another, each thread waiting for the others' (12 ms of a 25 ms DRAM hit).
The same library's C functions, which the package's extension exports, are called here
through ctypes, whose calls let go of the GIL: the hashes run on both cores, beside the
copies.

Checked once per process against the package's own digest (empty, unaligned and split
inputs); where the symbols are missing or disagree, :func:`checksum` hashes with the package
and :func:`updater` returns None (the C copies are not used). Small payloads stay in Python
(a ctypes call costs microseconds).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

log = logging.getLogger("kvtier")

MIN_BYTES = 64 * 1024  # smaller payloads: the package's hash (no ctypes round trips)


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        from xxhash import _xxhash  # type: ignore[attr-defined]

        lib = ctypes.CDLL(_xxhash.__file__)
        lib.XXH3_createState.restype = ctypes.c_void_p
        lib.XXH3_createState.argtypes = []
        lib.XXH3_freeState.restype = ctypes.c_int
        lib.XXH3_freeState.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_reset.restype = ctypes.c_int
        lib.XXH3_64bits_reset.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_update.restype = ctypes.c_int
        lib.XXH3_64bits_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.XXH3_64bits_digest.restype = ctypes.c_uint64
        lib.XXH3_64bits_digest.argtypes = [ctypes.c_void_p]
    except (ImportError, OSError, AttributeError) as exc:
        log.info("kvtier: xxh3 through ctypes unavailable (%s); hashing holds the GIL", exc)
        return None
    return lib


class State:
    """One thread's XXH3 state (freed when the thread ends and its locals go)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.ptr = lib, lib.XXH3_createState()
        if not self.ptr:
            raise MemoryError("XXH3_createState")

    def start(self, *parts: Any) -> None:
        """A new digest, fed ``parts`` (C-contiguous buffers) in order."""
        self.lib.XXH3_64bits_reset(self.ptr)
        for part in parts:
            array = np.frombuffer(part, dtype=np.uint8)  # its address, read-only bytes too
            if array.size:
                self.lib.XXH3_64bits_update(self.ptr, array.ctypes.data, array.size)

    def digest(self) -> int:
        return int(self.lib.XXH3_64bits_digest(self.ptr))

    def __del__(self) -> None:
        self.lib.XXH3_freeState(self.ptr)


_local = threading.local()


def _states(lib: ctypes.CDLL, count: int = 1) -> list[State]:
    """This thread's first ``count`` states."""
    states: list[State] = getattr(_local, "states", [])
    while len(states) < count:
        states.append(State(lib))
    _local.states = states
    return states[:count]


def _digest(lib: ctypes.CDLL, parts: Sequence[Any]) -> int:
    (state,) = _states(lib)
    state.start(*parts)
    return state.digest()


@functools.cache
def available() -> bool:
    """Whether the C functions load and give the package's digests (checked once)."""
    lib = _library()
    if lib is None:
        return False
    data = bytes(range(256)) * 1031
    view = memoryview(data)
    samples: list[list[Any]] = [[b""], [data], [data[:88], view[97:]], [data[3:5], view[7:70001]]]
    for parts in samples:
        want = xxhash.xxh3_64()
        for part in parts:
            want.update(part)
        if _digest(lib, parts) != want.intdigest():
            log.warning("kvtier: xxh3 through ctypes disagrees with the xxhash package; unused")
            return False
    return True


def updater(count: int) -> tuple[int, list[State]] | None:
    """(the address of ``XXH3_64bits_update``, ``count`` states of this thread) for C code
    that hashes what it moves (:mod:`kvtier.native`); None where :func:`available` is not."""
    if not available():
        return None
    lib = _library()
    assert lib is not None
    address = ctypes.cast(lib.XXH3_64bits_update, ctypes.c_void_p).value
    return (address, _states(lib, count)) if address else None


def checksum(prefix: Any, payload: Any) -> int:
    """xxh3-64 of ``prefix`` then ``payload``: through the C functions for large payloads,
    else (or where it is not available) the package's."""
    if memoryview(payload).nbytes >= MIN_BYTES and available():
        lib = _library()
        assert lib is not None
        return _digest(lib, [prefix, payload])
    h = xxhash.xxh3_64(prefix)
    h.update(payload)
    return h.intdigest()
