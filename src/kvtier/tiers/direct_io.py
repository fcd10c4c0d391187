"""O_DIRECT reads and writes through a page-aligned buffer per thread: the device reads into
and writes from that buffer, bypassing the page cache, and one copy moves the bytes between it
and the caller's (unaligned) buffers.

Used by the disk tier for large chunks and by the benchmarks' raw baseline, which must read and
write the same way: every O_DIRECT read and write in kvtier is here. Why O_DIRECT: see
:mod:`kvtier.tiers.disk`.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Sequence

ALIGN = 4096  # offsets, lengths and memory of O_DIRECT I/O are multiples of this
PIECE = 8 << 20  # the aligned buffer: the most one read or write moves


class AlignedBuffer(threading.local):
    """A page-aligned buffer of :data:`PIECE` bytes for each thread that asks."""

    buf: mmap.mmap | None = None

    def get(self) -> mmap.mmap:
        """This thread's buffer, its pages touched (the first use would fault them)."""
        if self.buf is None:
            buf = mmap.mmap(-1, PIECE)
            buf[:: mmap.PAGESIZE] = bytes(len(range(0, PIECE, mmap.PAGESIZE)))
            self.buf = buf
        return self.buf


def enable(fd: int) -> int | None:
    """Turn O_DIRECT on for ``fd``; its flags before, or None if the filesystem refuses."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return None
    return flags


def read_into(fd: int, buffers: Sequence[memoryview], piece: memoryview) -> bool:
    """Read the file ``fd`` (O_DIRECT on) from its start into ``buffers``, in order, through
    the aligned ``piece``; False if the file is shorter than the buffers (it changed). Raises
    OSError(EINVAL) where the filesystem refuses O_DIRECT reads."""
    todo, offset = list(buffers), 0
    while todo:
        left = sum(b.nbytes for b in todo)
        want = min(piece.nbytes, -(-left // ALIGN) * ALIGN)
        n = os.preadv(fd, [piece[:want]], offset)
        if n < min(want, left) and (n == 0 or n % ALIGN):
            return False
        offset += n
        at = 0
        while todo and at < n:  # scatter the piece into the caller's buffers
            take = min(todo[0].nbytes, n - at)
            todo[0][:take] = piece[at : at + take]
            at += take
            todo[0] = todo[0][take:]
            if not todo[0].nbytes:
                todo.pop(0)
    return True


def write_from(fd: int, view: memoryview, piece: memoryview) -> None:
    """Write ``view`` to the empty file ``fd`` (O_DIRECT on) from its start through the aligned
    ``piece``, in aligned pieces, the last one zero-padded; the file is then cut back to the
    data's length. Raises OSError(EINVAL) where the filesystem refuses O_DIRECT writes."""
    total = view.nbytes
    for start in range(0, total, piece.nbytes):
        n = min(piece.nbytes, total - start)
        piece[:n] = view[start : start + n]
        padded = -(-n // ALIGN) * ALIGN
        piece[n:padded] = bytes(padded - n)
        done = 0
        while done < padded:
            done += os.pwrite(fd, piece[done:padded], start + done)
    if total % ALIGN:
        os.ftruncate(fd, total)
