"""Where a disk tier's bytes live, and how they are read and written: one file per chunk,
written atomically, read into the caller's buffers (large chunks with O_DIRECT).

Layout: ``<root>/<first two hex digits>/<32 hex digits>.kvc``, temp files in ``<root>/.tmp``.
File names come from the key's hex digits only, so no input can reach outside ``root``, and
only names of that exact form are ever deleted, plus temp files whose writer is gone (a
writer holds an flock on its temp file until the rename; opening removes the temp files nobody
holds). Writes are atomic: temp file, optional fsync, rename over the final name. What is
indexed and evicted is :class:`~kvtier.tiers.disk.DiskTier`'s business.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from itertools import count
from pathlib import Path

from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.tiers import direct_io
from kvtier.tiers.base import Blob, front

SUFFIX = ".kvc"
_HEX = frozenset("0123456789abcdef")
_STALE_TMP_S = 3600.0  # where the filesystem has no locks: age alone decides
# Chunks this large are written and read with O_DIRECT, through a page-aligned buffer per
# thread. Writes: buffered writes of fresh data cost the writer ~1.8 ms of CPU per MB in
# page-cache faults here, O_DIRECT ~0.07 ms (the copy into the warm buffer). Reads: the
# kernel's copy out of the page cache cost 2 ms of CPU per 5.9 MB chunk in a plain process
# and 14 ms in a vLLM worker (an 8,000-token load took 400 ms there instead of 120), while an
# O_DIRECT read costs 1.1 ms in either (the device writes into the buffer; one copy out of
# it). The page cache would not help anyway: what is read again is promoted into DRAM. Small
# chunks stay buffered.
DIRECT_MIN = 1 << 20


def key_from_name(name: str) -> ChunkKey | None:
    """The key of a chunk file's name; None for any other name."""
    if len(name) != 2 * KEY_BYTES + len(SUFFIX) or not name.endswith(SUFFIX):
        return None
    stem = name[: 2 * KEY_BYTES]
    if not _HEX.issuperset(stem):
        return None
    return ChunkKey(bytes.fromhex(stem))


class ChunkFiles:
    """The chunk files under ``root``. Thread-safe: each call opens and closes its own file."""

    def __init__(self, root: Path, fsync: bool, read_only: bool, direct: bool):
        self.root = root
        self.fsync = fsync
        self.read_only = read_only  # inspection: never create, delete or touch anything
        # O_DIRECT for large chunks; turned off for good the first time the filesystem
        # refuses it (tmpfs on old kernels, some network filesystems).
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._direct_buffer = direct_io.AlignedBuffer()
        self._tmp = root / ".tmp"
        self._seq = count()
        self._host = socket.gethostname().replace(".", "_")
        if read_only:
            if not root.is_dir():
                raise FileNotFoundError(f"no such directory: {root}")
        else:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_files()

    def path_of(self, key: ChunkKey) -> Path:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
        hex_key = key.hex()
        return self.root / hex_key[:2] / (hex_key + SUFFIX)

    def entries(self) -> Iterator[tuple[ChunkKey, os.DirEntry[str]]]:
        """Every chunk file, with its key."""
        with os.scandir(self.root) as top:
            subdirs = [e.path for e in top if len(e.name) == 2 and _HEX.issuperset(e.name)]
        for sub in subdirs:
            try:
                with os.scandir(sub) as listed:
                    for entry in listed:
                        if (key := key_from_name(entry.name)) is not None:
                            yield key, entry
            except FileNotFoundError:
                continue

    def by_age(self) -> list[tuple[float, ChunkKey, int]]:
        """(mtime, key, size) of every chunk file, oldest first."""
        found: list[tuple[float, ChunkKey, int]] = []
        for key, entry in self.entries():
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, key, st.st_size))
        found.sort()
        return found

    def _remove_stale_temp_files(self) -> None:
        """Delete temp files whose writer is gone.

        A writer holds an exclusive flock on its temp file from creation to rename, and the
        kernel drops it when the writer dies, so a file we can lock has no writer (on any
        host, with NFS locking). We unlink while holding the lock; a writer that created the
        file but locked it only after us sees it unlinked and starts a new one
        (:meth:`_create_temp`).
        """
        now = time.time()
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                try:
                    fd = os.open(entry.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer
                except OSError:  # no locking on this filesystem: fall back to age alone
                    if now - os.fstat(fd).st_mtime < _STALE_TMP_S:
                        continue
                    with suppress(FileNotFoundError):
                        os.unlink(entry.path)
                else:
                    with suppress(FileNotFoundError):
                        os.unlink(entry.path)
                finally:
                    os.close(fd)

    def warm(self) -> None:
        """Touch the calling thread's O_DIRECT buffer now rather than on its first read."""
        if self.direct:
            self._direct_buffer.get()

    def open(self, key: ChunkKey) -> int | None:
        """A read-only fd of the chunk's file, or None if there is none."""
        try:
            return os.open(self.path_of(key), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def read_into(self, fd: int, buffers: Sequence[memoryview]) -> int:
        """Read the open file ``fd`` into ``buffers`` if it fits them (their front if it is
        smaller); its size."""
        size = os.fstat(fd).st_size
        if 0 < size < sum(b.nbytes for b in buffers):
            buffers = front(buffers, size)
        fits = size == sum(b.nbytes for b in buffers)
        direct = fits and size >= DIRECT_MIN and self.direct
        if fits and not (direct and self._read_direct(fd, buffers)):
            self._read_buffered(fd, buffers)
        if not self.read_only:
            with suppress(OSError):  # recency survives a restart; a read-only mount is fine
                os.utime(fd)
        return size

    def _read_buffered(self, fd: int, buffers: Sequence[memoryview]) -> None:
        """One preadv straight into the caller's buffers (through the page cache)."""
        todo, offset = list(buffers), 0
        while todo:
            n = os.preadv(fd, todo, offset)
            if n == 0:
                raise OSError(f"a chunk file shrank while being read (fd {fd})")
            offset += n
            while todo and n >= todo[0].nbytes:
                n -= todo[0].nbytes
                todo.pop(0)
            if todo and n:
                todo[0] = todo[0][n:]

    def _set_direct(self, fd: int) -> int | None:
        """Turn O_DIRECT on for ``fd``; its flags before, or None if the filesystem refuses
        (O_DIRECT is then off for good)."""
        if (flags := direct_io.enable(fd)) is None:
            self.direct = False
        return flags

    def _read_direct(self, fd: int, buffers: Sequence[memoryview]) -> bool:
        """Read the whole file into ``buffers`` bypassing the page cache, through this
        thread's aligned buffer; False if the filesystem refuses (O_DIRECT is then off for
        good) or the file changed (the caller reads it plainly and finds out)."""
        if (flags := self._set_direct(fd)) is None:
            return False
        try:
            with memoryview(self._direct_buffer.get()) as piece:
                return direct_io.read_into(fd, buffers, piece)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            return False
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)

    def header_of(self, key: ChunkKey, nbytes: int) -> bytes | None:
        """The first ``nbytes`` of a stored chunk, for inspection without a full read."""
        try:
            with open(self.path_of(key), "rb") as f:
                return f.read(nbytes)
        except FileNotFoundError:
            return None

    def _create_temp(self, key: ChunkKey) -> tuple[int, Path]:
        """A new temp file, locked (the lock tells clean-up that its writer is alive)."""
        for _ in range(3):
            tmp = self._tmp / f"{key.hex()}.{self._host}.{os.getpid()}.{next(self._seq)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                return fd, tmp  # no locking on this filesystem
            if os.fstat(fd).st_nlink:
                return fd, tmp
            os.close(fd)  # a clean-up removed it between our create and our lock
        raise OSError(f"temp files in {self._tmp} keep vanishing")

    def write(self, key: ChunkKey, blob: Blob) -> None:
        """Write the chunk's file atomically (temp file, fsync if asked, rename)."""
        final = self.path_of(key)
        fd, tmp = self._create_temp(key)
        try:  # the lock is held until after the rename (the fd closes last)
            view = memoryview(blob).cast("B")
            if not (self.direct and view.nbytes >= DIRECT_MIN and self._write_direct(fd, view)):
                while view:
                    view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                if final.parent.is_dir():
                    raise  # the temp file itself vanished
                final.parent.mkdir(exist_ok=True)  # first chunk in this fan-out directory
                os.rename(tmp, final)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)

    def _write_direct(self, fd: int, view: memoryview) -> bool:
        """Write ``view`` to the empty file ``fd`` bypassing the page cache; False if the
        filesystem refuses (the file is then empty again and O_DIRECT is off for good).

        O_DIRECT needs aligned memory, lengths and offsets: the data goes through a reused
        page-aligned buffer in aligned pieces, the last one zero-padded, and the file is
        then cut back to the data's length.
        """
        if (flags := self._set_direct(fd)) is None:
            return False
        try:
            with memoryview(self._direct_buffer.get()) as piece:
                direct_io.write_from(fd, view, piece)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False  # refused: start over with ordinary writes
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            return False
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        return True

    def unlink(self, key: ChunkKey) -> bool:
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            return False
        return True
