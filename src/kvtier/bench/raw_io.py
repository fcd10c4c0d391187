"""The raw medium that the benchmarks hold kvtier against: plain files written and read the
way the disk tier does it, cold reads, and pipelined Redis GETs, with none of kvtier's keys,
headers, checksums or bookkeeping."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis

from kvtier.tiers import direct_io
from kvtier.tiers import disk as disk_tier


def write_direct(paths: Sequence[Path], payloads: Sequence[Any], fsync: bool) -> None:
    """Each payload to its own file with O_DIRECT (buffered where refused), as the disk tier
    writes large chunks (:func:`kvtier.tiers.direct_io.write_from`)."""
    buffer = direct_io.AlignedBuffer()
    for path, payload in zip(paths, payloads, strict=True):
        view = memoryview(payload).cast("B")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            flags = direct_io.enable(fd) if hasattr(os, "O_DIRECT") else None
            try:
                if flags is None:
                    raise OSError(errno.EINVAL, "O_DIRECT refused")
                with memoryview(buffer.get()) as piece:
                    direct_io.write_from(fd, view, piece)
            except OSError as exc:  # no O_DIRECT here: write the bytes plainly
                if exc.errno != errno.EINVAL:
                    raise
                if flags is not None:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                os.ftruncate(fd, 0)
                os.pwrite(fd, view, 0)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def drop_cached(paths: Sequence[Path]) -> None:
    """Evict these files from the page cache (no privileges needed): the next read is cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_parallel(paths: Sequence[Path], dests: Sequence[Any]) -> None:
    """Read each file into its buffer on the disk tier's number of threads, the way the tier
    reads large chunks: O_DIRECT through a page-aligned buffer per thread (plain ``preadv``
    where O_DIRECT is refused)."""
    aligned = direct_io.AlignedBuffer()

    def read(item: tuple[Path, Any]) -> None:
        dest = memoryview(item[1]).cast("B")
        fd = os.open(item[0], os.O_RDONLY)
        try:
            if (flags := direct_io.enable(fd)) is not None:
                with memoryview(aligned.get()) as piece, suppress(OSError):
                    if direct_io.read_into(fd, [dest], piece):
                        return
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # refused: read plainly
            os.preadv(fd, [dest], 0)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(disk_tier.READERS) as pool:
        list(pool.map(read, zip(paths, dests, strict=True)))


def cold_read_s(paths: Sequence[Path]) -> float:
    """Seconds to read these files from the device (dropped from the page cache first)."""
    drop_cached(paths)
    dests = [bytearray(p.stat().st_size) for p in paths]
    start = time.perf_counter()
    read_parallel(paths, dests)
    return time.perf_counter() - start


def pipelined_get_s(url: str, keys: Sequence[bytes]) -> float:
    """Seconds for one pipelined round of plain GETs of ``keys`` (redis-py)."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        start = time.perf_counter()
        pipe.execute()
        return time.perf_counter() - start
    finally:
        client.close()


def redis_values(url: str, prefix: str) -> list[tuple[bytes, int]]:
    """(key, size) of every value whose key starts with ``prefix``."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix.encode() + b"*", count=1000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        return list(zip(keys, (int(n) for n in pipe.execute()), strict=True))
    finally:
        client.close()
