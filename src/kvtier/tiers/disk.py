"""Disk tier: one file per chunk under a directory (local NVMe or a shared mount); the files
themselves, their layout and their I/O are :mod:`kvtier.tiers.chunk_files`'.

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
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from kvtier.codec import SealedChunk
from kvtier.keys import ChunkKey
from kvtier.policy.eviction import EvictionPolicy, LRUPolicy
from kvtier.policy.quota import OwnerUsage, QuotaPolicy, owner_usage
from kvtier.threads import any_core, load_priority, on_each
from kvtier.tiers.base import Blob, PutResult, TierUsage, record_name
from kvtier.tiers.chunk_files import ChunkFiles

T = TypeVar("T")
R = TypeVar("R")
# Reads run on this many threads at once: a cold device delivers far more with several
# requests in flight (115 MB in 20 files here: 0.21-0.28 s one file at a time, 0.11 s four
# at a time, like `cat` with the kernel's readahead at best). Reads wait on the device and
# release the GIL; what CPU they take yields to the engine's compute threads
# (threads.load_priority).
READERS = 4
OWNER_BYTES = 64  # enough of a chunk's head to tell its owner (kvtier.owners)
RECORDS = "records"  # a directory beside the chunks' (not two hex digits: never scanned)


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
        owner_of: Callable[[Blob], Hashable] | None = None,
    ):
        """``owner_of``: the owner (tenant) of a stored chunk, for a policy that divides the
        tier among owners (:class:`kvtier.policy.quota.QuotaPolicy`); chunks found on disk
        are attributed from their first bytes."""
        if capacity <= 0:
            raise ValueError(f"disk tier capacity must be positive, got {capacity}")
        self.name = name
        self.zero_copy_reads = False
        self.fills_front = True
        self.root = Path(path).expanduser()
        self.capacity = capacity
        self.read_only = read_only  # inspection: never create, delete or touch anything
        self.files = ChunkFiles(self.root, fsync, read_only, direct)
        self.path_of = self.files.path_of
        self.header_of = self.files.header_of
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._owner_of = owner_of
        self._lock = threading.Lock()
        # Keys whose file this process is writing, and victims chosen but not yet unlinked:
        # while a key is in one of them, what the filesystem shows of it is in flux and must
        # not change the index (a missing file being written is not gone; a file being
        # deleted must not be re-indexed).
        self._writing: set[ChunkKey] = set()
        self._deleting: set[ChunkKey] = set()
        self._readers: ThreadPoolExecutor | None = None  # started on the first batch read
        self._readers_lock = threading.Lock()
        self._rebuild_index()

    @property
    def direct(self) -> bool:
        """Whether large chunks still go through O_DIRECT (off once the filesystem refused)."""
        return self.files.direct

    # -- paths and index -------------------------------------------------------------------

    def _rebuild_index(self) -> None:
        found = self.files.by_age()
        owners = [self._file_owner(key) for _, key, _ in found]
        with self._lock:
            for (_, key, size), owner in zip(found, owners, strict=True):
                self._policy.insert(key, size, owner)

    def _file_owner(self, key: ChunkKey) -> Hashable:
        """The owner of a chunk already on disk, from its first bytes (None without
        ``owner_of``; the unknown owner, ``owner_of(b"")``, when they cannot be read)."""
        if self._owner_of is None:
            return None
        try:
            head = self.header_of(key, OWNER_BYTES)
        except OSError:  # unreadable: an owner unknown (it goes first), never a failure here
            head = None
        return self._owner_of(head or b"")

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
                self._policy.insert(key, size, self._file_owner(key))
            elif used:
                policy = self._policy
                if isinstance(policy, QuotaPolicy) and policy.unowned(key):
                    # Found at start before its namespace's tenant was known (a chunk in
                    # clear): its first use tells it, and it moves into its tenant's share.
                    owner = self._file_owner(key)
                    if policy.knows(owner):
                        policy.insert(key, size, owner)
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
        return list(self._pool().map(read, items))

    def _pool(self) -> ThreadPoolExecutor:
        with self._readers_lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(
                    READERS, thread_name_prefix="kvtier-read", initializer=_reader_thread
                )
            return self._readers

    def warm(self) -> None:
        """Start the reader threads and touch each one's O_DIRECT buffer now, as a server
        starts: else the first hit after a start pays for both (four threads faulting in
        8 MB each, ~20 ms of CPU on a 2-core Xeon) before it reads a byte."""
        on_each(self._pool(), READERS, self.warm_thread)

    def warm_thread(self) -> None:
        """Touch the calling thread's O_DIRECT buffer now (a thread of a caller's that reads
        through this tier, as a load's readers do), rather than on its first read."""
        self.files.warm()

    def _open(self, key: ChunkKey) -> int | None:
        """A read-only fd of the chunk's file, or None (and forget the key) if it is gone."""
        fd = self.files.open(key)
        if fd is None:
            self._sync(key)
        return fd

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
            size = self.files.read_into(fd, buffers)
        finally:
            os.close(fd)
        self._sync(key, used=True)
        return size

    def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> PutResult:
        if self.read_only:
            raise PermissionError(f"disk tier {self.name!r} at {self.root} is read-only")
        stored: list[bool] = []
        evicted: list[ChunkKey] = []
        for n, (key, blob) in enumerate(items):
            size = memoryview(blob).nbytes
            owner = self._owner_of(blob) if self._owner_of is not None else None
            with self._lock:
                old = self._policy.size_of(key)
                self._policy.remove(key)
                victims = self._policy.victims(size, self.capacity, owner)
                if victims is None:
                    if old is not None:  # the old file stays: keep it indexed
                        self._policy.insert(key, old, owner)
                    stored.append(False)
                    continue
                sizes = [self._policy.size_of(v) or 0 for v in victims]
                for victim in victims:
                    self._policy.remove(victim)
                    self._deleting.add(victim)  # type: ignore[arg-type]
                # Account for the file before writing it, pinned while in flight, so that
                # concurrent puts neither overshoot the capacity nor evict it half-written.
                self._policy.insert(key, size, owner)
                self._policy.pin(key)
                self._writing.add(key)
            try:
                self._evict(victims, sizes, evicted)  # type: ignore[arg-type]
                self.files.write(key, blob)
            except Exception as exc:
                with self._lock:
                    self._policy.remove(key)
                    if old is not None:  # a failed write leaves the old file in place
                        self._policy.insert(key, old, owner)
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
                self.files.unlink(victim)
            except BaseException:
                owners = [self._file_owner(v) for v in victims[i:]]
                with self._lock:
                    for v, s, o in zip(victims[i:], sizes[i:], owners, strict=True):
                        self._deleting.discard(v)
                        self._policy.insert(v, s, o)
                raise
            with self._lock:
                self._deleting.discard(victim)
            evicted.append(victim)

    def delete(self, key: ChunkKey) -> bool:
        if self.read_only:
            raise PermissionError(f"disk tier {self.name!r} at {self.root} is read-only")
        with self._lock:
            self._policy.remove(key)
        return self.files.unlink(key)

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.pin(key)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.unpin(key)

    def scan(self) -> Iterator[ChunkKey]:
        for key, _ in self.files.entries():
            yield key

    def read_record(self, name: str) -> bytes | None:
        try:
            return (self.root / RECORDS / record_name(name)).read_bytes()
        except FileNotFoundError:
            return None

    def write_record(self, name: str, value: bytes, only_new: bool = False) -> bool:
        if self.read_only:
            raise PermissionError(f"disk tier {self.name!r} at {self.root} is read-only")
        path = self.root / RECORDS / record_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        fresh.write_bytes(value)
        os.chmod(fresh, 0o600)
        if only_new:  # link: fails if the record exists, never leaves a partial one
            try:
                os.link(fresh, path)
            except FileExistsError:
                return False
            finally:
                fresh.unlink()
            return True
        os.replace(fresh, path)
        return True

    def delete_record(self, name: str) -> bool:
        if self.read_only:
            raise PermissionError(f"disk tier {self.name!r} at {self.root} is read-only")
        try:
            (self.root / RECORDS / record_name(name)).unlink()
        except FileNotFoundError:
            return False
        return True

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(len(self._policy), self._policy.used_bytes, self.capacity)

    def owner_usage(self) -> dict[Hashable, OwnerUsage]:
        """Each owner's part of the tier (empty unless its policy divides it among owners)."""
        with self._lock:
            return owner_usage(self._policy, self.capacity)

    def close(self) -> None:
        """Stop the reader threads; every operation opens and closes its own file."""
        with self._readers_lock:
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)


def _reader_thread() -> None:
    any_core()
    load_priority()
