"""Disk tier: one file per chunk under a directory (local NVMe or a shared mount).

Layout: ``<root>/<first two hex digits>/<32 hex digits>.kvc``, temp files in ``<root>/.tmp``.
File names come from the key's hex digits only, so no input can reach outside ``root``, and
the tier only ever deletes names of that exact form.

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

import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from itertools import count
from pathlib import Path

from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.policy.eviction import EvictionPolicy, LRUPolicy
from kvtier.tiers.base import Blob, PutResult, TierUsage

SUFFIX = ".kvc"
_HEX = frozenset("0123456789abcdef")
_STALE_TMP_S = 3600.0


def _key_from_name(name: str) -> ChunkKey | None:
    if len(name) != 2 * KEY_BYTES + len(SUFFIX) or not name.endswith(SUFFIX):
        return None
    stem = name[: 2 * KEY_BYTES]
    if not _HEX.issuperset(stem):
        return None
    return ChunkKey(bytes.fromhex(stem))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskTier:
    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        name: str = "disk",
        fsync: bool = True,
        policy: EvictionPolicy | None = None,
        read_only: bool = False,
    ):
        if capacity <= 0:
            raise ValueError(f"disk tier capacity must be positive, got {capacity}")
        self.name = name
        self.zero_copy_reads = False
        self.root = Path(path).expanduser()
        self.capacity = capacity
        self.fsync = fsync
        self.read_only = read_only  # inspection: never create, delete or touch anything
        self._tmp = self.root / ".tmp"
        if read_only:
            if not self.root.is_dir():
                raise FileNotFoundError(f"no such directory: {self.root}")
        else:
            self._tmp.mkdir(parents=True, exist_ok=True)
        self._policy: EvictionPolicy = policy or LRUPolicy()
        self._lock = threading.Lock()
        self._seq = count()
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
        """Delete temp files of dead writers on this host, and any older than an hour."""
        now = time.time()
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                parts = entry.name.split(".")
                try:
                    dead = (
                        len(parts) == 5 and parts[1] == self._host and not _pid_alive(int(parts[2]))
                    )
                    if dead or now - entry.stat().st_mtime > _STALE_TMP_S:
                        os.unlink(entry.path)
                except (ValueError, FileNotFoundError):
                    continue

    # -- the Tier protocol -----------------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        # Always ask the filesystem: another process may have written or evicted a chunk.
        out = []
        for key in keys:
            try:
                size = os.stat(self.path_of(key)).st_size
            except FileNotFoundError:
                with self._lock:
                    self._policy.remove(key)
                out.append(False)
                continue
            with self._lock:
                if key not in self._policy:
                    self._policy.insert(key, size)
            out.append(True)
        return out

    def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        return [self._get(key) for key in keys]

    def _open(self, key: ChunkKey) -> int | None:
        """A read-only fd of the chunk's file, or None (and forget the key) if it is gone."""
        try:
            return os.open(self.path_of(key), os.O_RDONLY)
        except FileNotFoundError:
            with self._lock:
                self._policy.remove(key)
            return None

    def _get(self, key: ChunkKey) -> bytes | None:
        if (fd := self._open(key)) is None:
            return None
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size)
            if len(data) < size:  # rare short read: keep reading
                parts = [data]
                got = len(data)
                while got < size and (more := os.read(fd, size - got)):
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            self._touch(fd, key, size)
        finally:
            os.close(fd)
        return data

    def read_into_many(
        self, items: Sequence[tuple[ChunkKey, Sequence[memoryview]]]
    ) -> list[int | None]:
        return [self._read_into(key, buffers) for key, buffers in items]

    def _read_into(self, key: ChunkKey, buffers: Sequence[memoryview]) -> int | None:
        if (fd := self._open(key)) is None:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == sum(b.nbytes for b in buffers):
                # One preadv straight into the caller's buffers: no intermediate copy.
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
            self._touch(fd, key, size)
        finally:
            os.close(fd)
        return size

    def _touch(self, fd: int, key: ChunkKey, size: int) -> None:
        if not self.read_only:
            with suppress(OSError):  # recency survives a restart; a read-only mount is fine
                os.utime(fd)
        with self._lock:
            if key in self._policy:
                self._policy.touch(key)
            else:
                self._policy.insert(key, size)

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
        for key, blob in items:
            size = memoryview(blob).nbytes
            with self._lock:
                self._policy.remove(key)
                victims = self._policy.victims(size, self.capacity)
                if victims is None:
                    stored.append(False)
                    continue
                for victim in victims:
                    self._policy.remove(victim)
                # Account for the file before writing it, pinned while in flight, so that
                # concurrent puts neither overshoot the capacity nor evict it half-written.
                self._policy.insert(key, size)
                self._policy.pin(key)
            try:
                for victim in victims:
                    self._unlink(victim)  # type: ignore[arg-type]
                evicted.extend(victims)  # type: ignore[arg-type]
                self._write(key, blob)
            except BaseException:
                with self._lock:
                    self._policy.remove(key)
                raise
            finally:
                with self._lock:
                    self._policy.unpin(key)
            stored.append(True)
        return PutResult(stored, evicted)

    def _write(self, key: ChunkKey, blob: Blob) -> None:
        final = self.path_of(key)
        tmp = self._tmp / f"{key.hex()}.{self._host}.{os.getpid()}.{next(self._seq)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(blob).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        try:
            try:
                os.rename(tmp, final)
            except FileNotFoundError:  # first chunk in this fan-out directory
                final.parent.mkdir(exist_ok=True)
                os.rename(tmp, final)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

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
        """Nothing to release: every operation opens and closes its own file."""
