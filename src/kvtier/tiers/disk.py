"""Disk tier: one file per chunk under a directory (local NVMe or a shared mount).

Layout: ``<root>/<first two hex digits>/<32 hex digits>.kvc``, temp files in ``<root>/.tmp``.
File names come from the key's hex digits only, so no input can reach outside ``root``, and
the tier only ever deletes names of that exact form, plus temp files whose writer is gone
(a writer holds an flock on its temp file until the rename; opening the tier removes the
temp files nobody holds).

Writes are atomic: temp file, optional fsync, rename over the final name. A reader therefore
sees a whole old file, a whole new file, or nothing — never a torn one — also when several
processes share the directory or a writer is killed mid-write. The directory is not fsynced
after the rename: after a power loss a chunk may be missing, which is a miss (recompute),
never a corruption.

The in-memory index (sizes + recency) is rebuilt from the directory on open, oldest mtime
first, and a read refreshes the file's mtime so recency survives restarts. Processes sharing
a directory each bound what *they* index; a chunk another process wrote is discovered when
it is asked for, and a chunk another process evicted reads as a miss.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from itertools import count
from pathlib import Path
from typing import TypeVar

from kvtier.codec import SealedChunk
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.policy.eviction import EvictionPolicy, LRUPolicy
from kvtier.threads import any_core, load_priority
from kvtier.tiers import direct_io
from kvtier.tiers.base import Blob, PutResult, TierUsage

T = TypeVar("T")
R = TypeVar("R")
SUFFIX = ".kvc"
_HEX = frozenset("0123456789abcdef")
# Reads run on this many threads at once: a cold device delivers far more with several
# requests in flight (115 MB in 20 files here: 0.21-0.28 s one file at a time, 0.11 s four
# at a time, like `cat` with the kernel's readahead at best). Reads wait on the device and
# release the GIL; what CPU they take yields to the engine's compute threads
# (threads.load_priority).
READERS = 4
_STALE_TMP_S = 3600.0  # where the filesystem has no locks: age alone decides
# Chunks this large are written and read with O_DIRECT, through a page-aligned buffer per
# thread. Writes: buffered writes of fresh data cost the writer ~1.8 ms of CPU per MB in
# page-cache faults here, O_DIRECT ~0.07 ms (the copy into the warm buffer). Reads: the
# kernel's copy out of the page cache cost 2 ms of CPU per 5.9 MB chunk in a plain process
# and 14 ms in a vLLM worker (an 8,000-token load took 400 ms there instead of 120), while an
# O_DIRECT read costs 1.1 ms in either (the device writes into the buffer; one copy out of
# it). The page cache would not help anyway: what is read again is promoted into DRAM. Small
# chunks stay buffered.
_DIRECT_MIN = 1 << 20


def _key_from_name(name: str) -> ChunkKey | None:
    if len(name) != 2 * KEY_BYTES + len(SUFFIX) or not name.endswith(SUFFIX):
        return None
    stem = name[: 2 * KEY_BYTES]
    if not _HEX.issuperset(stem):
        return None
    return ChunkKey(bytes.fromhex(stem))


class DiskTier:
    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        name: str = "disk",
        fsync: bool = True,
        policy: EvictionPolicy | None = None,
        read_only: bool = False,
        direct: bool = True,
    ):
        if capacity <= 0:
            raise ValueError(f"disk tier capacity must be positive, got {capacity}")
        self.name = name
        self.zero_copy_reads = False
        self.root = Path(path).expanduser()
        self.capacity = capacity
        self.fsync = fsync
        self.read_only = read_only  # inspection: never create, delete or touch anything
        # O_DIRECT for large chunks; turned off for good the first time the filesystem
        # refuses it (tmpfs on old kernels, some network filesystems).
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._direct_buffer = direct_io.AlignedBuffer()
        self._tmp = self.root / ".tmp"
        if read_only:
            if not self.root.is_dir():
                raise FileNotFoundError(f"no such directory: {self.root}")
        else:
            self._tmp.mkdir(parents=True, exist_ok=True)
        self._policy: EvictionPolicy = policy or LRUPolicy()
        self._lock = threading.Lock()
        # Keys whose file this process is writing, and victims chosen but not yet unlinked:
        # while a key is in one of them, what the filesystem shows of it is in flux and must
        # not change the index (a missing file being written is not gone; a file being
        # deleted must not be re-indexed).
        self._writing: set[ChunkKey] = set()
        self._deleting: set[ChunkKey] = set()
        self._seq = count()
        self._readers: ThreadPoolExecutor | None = None  # started on the first batch read
        self._readers_lock = threading.Lock()
        self._host = socket.gethostname().replace(".", "_")
        if not read_only:
            self._remove_stale_temp_files()
        self._rebuild_index()

    # -- paths and index -------------------------------------------------------------------

    def path_of(self, key: ChunkKey) -> Path:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
        hex_key = key.hex()
        return self.root / hex_key[:2] / (hex_key + SUFFIX)

    def _chunk_files(self) -> Iterator[os.DirEntry[str]]:
        with os.scandir(self.root) as top:
            subdirs = [e.path for e in top if len(e.name) == 2 and _HEX.issuperset(e.name)]
        for sub in subdirs:
            try:
                with os.scandir(sub) as entries:
                    for entry in entries:
                        if entry.name.endswith(SUFFIX):
                            yield entry
            except FileNotFoundError:
                continue

    def _rebuild_index(self) -> None:
        found: list[tuple[float, ChunkKey, int]] = []
        for entry in self._chunk_files():
            key = _key_from_name(entry.name)
            if key is None:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, key, st.st_size))
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._policy.insert(key, size)

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

    def _sync(self, key: ChunkKey, used: bool = False) -> int | None:
        """Bring the index in line with the key's file; return its size, None if absent.

        The stat happens under the lock, so none of this process's puts or evictions can
        slip between what we saw and what we record; keys this process is writing or
        deleting are left alone (their file is in flux).
        """
        path = self.path_of(key)
        with self._lock:
            try:
                size: int | None = os.stat(path).st_size
            except FileNotFoundError:
                size = None
            if key in self._writing or key in self._deleting:
                return size
            if size is None:
                self._policy.remove(key)
            elif key not in self._policy:
                self._policy.insert(key, size)
            elif used:
                self._policy.touch(key)
            return size

    # -- the Tier protocol -----------------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        # Always ask the filesystem: another process may have written or evicted a chunk.
        return [self._sync(key) is not None for key in keys]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        return self._in_parallel(self._get, keys)

    def _in_parallel(self, read: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[read(item) for item in items]``, up to :data:`READERS` at a time."""
        if len(items) <= 1:
            return [read(item) for item in items]
        with self._readers_lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(
                    READERS, thread_name_prefix="kvtier-read", initializer=_reader_thread
                )
            readers = self._readers
        return list(readers.map(read, items))

    def _open(self, key: ChunkKey) -> int | None:
        """A read-only fd of the chunk's file, or None (and forget the key) if it is gone."""
        try:
            return os.open(self.path_of(key), os.O_RDONLY)
        except FileNotFoundError:
            self._sync(key)
            return None

    def _get(self, key: ChunkKey) -> SealedChunk | None:
        for _ in range(3):  # a file replaced between the size and the read: read the new one
            if (fd := self._open(key)) is None:
                return None
            size = os.fstat(fd).st_size
            data = SealedChunk(size)  # stored bytes, never written again
            if self._read_into(fd, key, [memoryview(data)]) == size:
                return data
        raise OSError(f"{self.path_of(key)} keeps changing while being read")

    def read_into_many(
        self, items: Sequence[tuple[ChunkKey, Sequence[memoryview]]]
    ) -> list[int | None]:
        return self._in_parallel(self._read_one, items)

    def _read_one(self, item: tuple[ChunkKey, Sequence[memoryview]]) -> int | None:
        key, buffers = item
        fd = self._open(key)
        return None if fd is None else self._read_into(fd, key, buffers)

    def _read_into(self, fd: int, key: ChunkKey, buffers: Sequence[memoryview]) -> int:
        """Read the open file ``fd`` into ``buffers`` if it fits them; closes ``fd``."""
        try:
            size = os.fstat(fd).st_size
            fits = size == sum(b.nbytes for b in buffers)
            direct = fits and size >= _DIRECT_MIN and self.direct
            if fits and not (direct and self._read_direct(fd, buffers)):
                self._read_buffered(fd, key, buffers)
            self._touch(fd, key)
        finally:
            os.close(fd)
        return size

    def _read_buffered(self, fd: int, key: ChunkKey, buffers: Sequence[memoryview]) -> None:
        """One preadv straight into the caller's buffers (through the page cache)."""
        todo, offset = list(buffers), 0
        while todo:
            n = os.preadv(fd, todo, offset)
            if n == 0:
                raise OSError(f"{self.path_of(key)} shrank while being read")
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

    def _touch(self, fd: int, key: ChunkKey) -> None:
        if not self.read_only:
            with suppress(OSError):  # recency survives a restart; a read-only mount is fine
                os.utime(fd)
        self._sync(key, used=True)

    def header_of(self, key: ChunkKey, nbytes: int) -> bytes | None:
        """The first ``nbytes`` of a stored chunk, for inspection without a full read."""
        try:
            with open(self.path_of(key), "rb") as f:
                return f.read(nbytes)
        except FileNotFoundError:
            return None

    def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> PutResult:
        if self.read_only:
            raise PermissionError(f"disk tier {self.name!r} at {self.root} is read-only")
        stored: list[bool] = []
        evicted: list[ChunkKey] = []
        for n, (key, blob) in enumerate(items):
            size = memoryview(blob).nbytes
            with self._lock:
                old = self._policy.size_of(key)
                self._policy.remove(key)
                victims = self._policy.victims(size, self.capacity)
                if victims is None:
                    if old is not None:  # the old file stays: keep it indexed
                        self._policy.insert(key, old)
                    stored.append(False)
                    continue
                sizes = [self._policy.size_of(v) or 0 for v in victims]
                for victim in victims:
                    self._policy.remove(victim)
                    self._deleting.add(victim)  # type: ignore[arg-type]
                # Account for the file before writing it, pinned while in flight, so that
                # concurrent puts neither overshoot the capacity nor evict it half-written.
                self._policy.insert(key, size)
                self._policy.pin(key)
                self._writing.add(key)
            try:
                self._evict(victims, sizes, evicted)  # type: ignore[arg-type]
                self._write(key, blob)
            except Exception as exc:
                with self._lock:
                    self._policy.remove(key)
                    if old is not None:  # a failed write leaves the old file in place
                        self._policy.insert(key, old)
                stored.extend([False] * (len(items) - n))
                return PutResult(stored, evicted, exc)
            finally:
                with self._lock:
                    self._policy.unpin(key)
                    self._writing.discard(key)
            stored.append(True)
        return PutResult(stored, evicted)

    def _evict(self, victims: list[ChunkKey], sizes: list[int], evicted: list[ChunkKey]) -> None:
        """Unlink victims, appending each to ``evicted``; re-index the ones that stay."""
        for i, victim in enumerate(victims):
            try:
                self._unlink(victim)
            except BaseException:
                with self._lock:
                    for v, s in zip(victims[i:], sizes[i:], strict=True):
                        self._deleting.discard(v)
                        self._policy.insert(v, s)
                raise
            with self._lock:
                self._deleting.discard(victim)
            evicted.append(victim)

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

    def _write(self, key: ChunkKey, blob: Blob) -> None:
        final = self.path_of(key)
        fd, tmp = self._create_temp(key)
        try:  # the lock is held until after the rename (the fd closes last)
            view = memoryview(blob).cast("B")
            if not (self.direct and view.nbytes >= _DIRECT_MIN and self._write_direct(fd, view)):
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

    def _unlink(self, key: ChunkKey) -> bool:
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: ChunkKey) -> bool:
        if self.read_only:
            raise PermissionError(f"disk tier {self.name!r} at {self.root} is read-only")
        with self._lock:
            self._policy.remove(key)
        return self._unlink(key)

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.pin(key)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.unpin(key)

    def scan(self) -> Iterator[ChunkKey]:
        for entry in self._chunk_files():
            key = _key_from_name(entry.name)
            if key is not None:
                yield key

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(len(self._policy), self._policy.used_bytes, self.capacity)

    def close(self) -> None:
        """Stop the reader threads; every operation opens and closes its own file."""
        with self._readers_lock:
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)


def _reader_thread() -> None:
    any_core()
    load_priority()
