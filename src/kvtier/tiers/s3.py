"""Object-storage tier (G4): one object per chunk in an S3 bucket, under ``<prefix>/v1/``.

The bucket may be shared by every engine of a pod. Each tier instance keeps an index of the
chunks it knows (listed at start, page by page; learnt from its own writes and from probes),
bounded in bytes by its eviction policy: it deletes objects to stay under its capacity, and
only objects of its own prefix. A key the index does not know is probed with HEAD (another
engine may have uploaded it); misses are remembered for a few seconds, and a probe stops at
the first miss of a batch, so a cold prompt costs one round of HEADs, not one per chunk. An
indexed object deleted elsewhere is a miss, dropped from the index.

Writes are conditional (``If-None-Match: *``) when the index does not know the key: a chunk
another engine already uploaded is not sent again (counted in :attr:`S3Tier.skipped`). A store
that refuses conditional writes gets a HEAD before each PUT instead. Reads run
``concurrency`` GETs at a time, each straight into the caller's buffers.

Why one object per chunk (not per layer group with ranged GETs): a load needs every layer of a
chunk, a chunk is 1-12 MB (a store's efficient range), and one GET per chunk keeps requests,
and the store's per-request cost, lowest. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar, cast

from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.policy.eviction import EvictionPolicy, LRUPolicy
from kvtier.policy.quota import OwnerUsage
from kvtier.tiers.base import Blob, PutResult, TierUsage, record_name
from kvtier.tiers.s3_client import S3Client, S3Error

log = logging.getLogger("kvtier")
T = TypeVar("T")
R = TypeVar("R")
MISS_TTL_S = 5.0  # how long a probed miss is believed (vLLM asks again every step)
PROBE_BUDGET_S = 0.02  # how long a lookup waits for HEAD probes (one round nearby, not AWS's)
_HEX = frozenset("0123456789abcdef")


class S3Tier:
    def __init__(
        self,
        client: S3Client,
        capacity: int,
        name: str = "s3",
        prefix: str = "kvtier",
        policy: EvictionPolicy | None = None,
        concurrency: int = 8,
        read_only: bool = False,
        miss_ttl_s: float = MISS_TTL_S,
        probe_budget_s: float = PROBE_BUDGET_S,
        must_list: bool = False,
    ):
        if capacity <= 0:
            raise ValueError(f"s3 tier capacity must be positive, got {capacity}")
        self.name = name
        self.zero_copy_reads = False
        self.fills_front = True
        self.client = client
        self.capacity = capacity
        self.read_only = read_only
        self.prefix = prefix.strip("/")
        self._chunks = f"{self.prefix}/v1/"
        self._records = f"{self.prefix}/records/"  # outside the chunks' prefix: never listed
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._lock = threading.Lock()
        self._misses: dict[ChunkKey, float] = {}  # probed and absent, until then
        self._conditional = True  # the store honours If-None-Match on PUT
        self.miss_ttl_s = miss_ttl_s
        self.probe_budget_s = probe_budget_s
        self._probing = 0  # HEAD probes sent and not answered
        self.uploads = 0  # chunks sent
        self.skipped = 0  # chunks not uploaded: another writer's copy was there
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"kvtier-{name}")
        self._concurrency = concurrency
        self._rebuild_index(must_list)

    # -- names and index ---------------------------------------------------------------------

    def object_name(self, key: ChunkKey) -> str:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
        return self._chunks + key.hex()

    def _key_of(self, name: str) -> ChunkKey | None:
        stem = name[len(self._chunks) :] if name.startswith(self._chunks) else ""
        if len(stem) != 2 * KEY_BYTES or not _HEX.issuperset(stem):
            return None
        return ChunkKey(bytes.fromhex(stem))

    def _listing(self) -> Iterator[tuple[ChunkKey, int, str]]:
        for name, size, modified in self.client.list(self._chunks):
            if (key := self._key_of(name)) is not None:
                yield key, size, modified

    def _rebuild_index(self, must_list: bool) -> None:
        """Index every chunk of the prefix, oldest first (an ISO time sorts as text). A store
        that cannot be listed (down, no such bucket) leaves the index empty, unless
        ``must_list``: an engine starts anyway (its misses are recomputed; probes find chunks
        once the store answers), an inspection says why it cannot."""
        started = time.monotonic()
        try:
            found = sorted(self._listing(), key=lambda item: item[2])
        except (S3Error, OSError) as exc:
            if must_list:
                raise
            log.warning(
                "kvtier: tier %r could not list s3://%s/%s (%s): starting with an empty index",
                *(self.name, self.client.bucket, self._chunks, exc),
            )
            return
        with self._lock:
            for key, size, _ in found:
                self._policy.insert(key, size)
        if found:
            log.info(
                "kvtier: tier %r indexed %d chunks (%d bytes) of s3://%s/%s in %.1f s",
                *(self.name, len(found), sum(s for _, s, _ in found), self.client.bucket),
                *(self._chunks, time.monotonic() - started),
            )

    def _forget(self, key: ChunkKey) -> None:
        with self._lock:
            self._policy.remove(key)

    def _learn(self, key: ChunkKey, size: int, used: bool = False) -> None:
        with self._lock:
            self._misses.pop(key, None)
            if key not in self._policy:
                self._policy.insert(key, size)
            elif used:
                self._policy.touch(key)

    def _in_parallel(self, call: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) <= 1:
            return [call(item) for item in items]
        return list(self._pool.map(call, items))

    # -- the Tier protocol -------------------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """The index's answer, and for keys it does not know, what HEAD probes say within
        :attr:`probe_budget_s` (a lookup runs in vLLM's scheduler loop: a remote store's round
        trips must not stall every request). A probe answering later still fills the index
        for the next lookup."""
        now = time.monotonic()
        with self._lock:
            known = [key in self._policy for key in keys]
            fresh_miss = [self._misses.get(key, 0.0) > now for key in keys]
        unknown = [i for i, k in enumerate(known) if not k and not fresh_miss[i]]
        out = list(known)
        deadline = now + self.probe_budget_s
        for start in range(0, len(unknown), self._concurrency):
            with self._lock:  # a stalled store: probes still out, no more sent
                if self._probing >= self._concurrency:
                    break
                self._probing += len(unknown[start : start + self._concurrency])
            window = [keys[i] for i in unknown[start : start + self._concurrency]]
            probes = [self._pool.submit(self._probe, key) for key in window]
            done, _ = wait(probes, timeout=max(0.0, deadline - time.monotonic()))
            found = [p.result() if p in done else None for p in probes]  # a failure raises
            for i, held in zip(unknown[start : start + self._concurrency], found, strict=True):
                out[i] = bool(held)
            if not all(found):  # the leading run ends here (or the budget did)
                break
        if len(self._misses) > 65536:
            with self._lock:
                self._misses = {k: t for k, t in self._misses.items() if t > now}
        return out

    def _probe(self, key: ChunkKey) -> bool:
        """HEAD one key and note the answer in the index (or as a miss, for a while)."""
        try:
            size = self.client.head(self.object_name(key))
        finally:
            with self._lock:
                self._probing -= 1
        if size is None:
            with self._lock:
                self._misses[key] = time.monotonic() + self.miss_ttl_s
            return False
        self._learn(key, size)
        return True

    def get_many(self, keys: Sequence[ChunkKey]) -> list[Blob | None]:
        return self._in_parallel(self._get, keys)

    def _get(self, key: ChunkKey) -> Blob | None:
        data = self.client.get(self.object_name(key))
        if data is None:
            self._forget(key)
            return None
        self._learn(key, len(data), used=True)
        return data

    def read_into_many(
        self, items: Sequence[tuple[ChunkKey, Sequence[memoryview]]]
    ) -> list[int | None]:
        return self._in_parallel(self._read_into, items)

    def _read_into(self, item: tuple[ChunkKey, Sequence[memoryview]]) -> int | None:
        key, buffers = item
        size = self.client.get_into(self.object_name(key), buffers)
        if size is None:
            self._forget(key)
        else:
            self._learn(key, size, used=True)
        return size

    def put_many(self, items: Sequence[tuple[ChunkKey, Blob]]) -> PutResult:
        """Room is made for every item first (evictions, in order), then the uploads run
        ``concurrency`` at a time. A failed upload is not stored; the first error is
        reported, and every other item's outcome as it happened."""
        if self.read_only:
            raise PermissionError(f"s3 tier {self.name!r} is read-only")
        stored = [False] * len(items)
        evicted: list[ChunkKey] = []
        planned: list[tuple[int, ChunkKey, Blob, bool]] = []  # (index, key, blob, replace)
        victims: list[tuple[ChunkKey, int]] = []  # and their sizes, to re-index if kept
        old_sizes: dict[ChunkKey, int] = {}
        with self._lock:
            for n, (key, blob) in enumerate(items):
                size = memoryview(blob).nbytes
                old = self._policy.size_of(key)
                self._policy.remove(key)
                found = self._policy.victims(size, self.capacity)
                if found is None:
                    if old is not None:
                        self._policy.insert(key, old)
                    continue
                for victim in cast(list[ChunkKey], found):
                    victims.append((victim, self._policy.size_of(victim) or 0))
                    self._policy.remove(victim)
                self._policy.insert(key, size)  # counted while in flight: no overshoot
                self._policy.pin(key)
                planned.append((n, key, blob, old is not None))
                if old is not None:
                    old_sizes[key] = old
        error: Exception | None = None
        existing = 0
        try:
            removed = self._in_parallel(self._remove, [v for v, _ in victims])
            for (victim, size), gone in zip(victims, removed, strict=True):
                if gone is None:
                    evicted.append(victim)
                else:  # still in the bucket: still counted against the bound
                    error = error or gone
                    with self._lock:
                        self._policy.insert(victim, size)
            outcomes = self._in_parallel(self._put_one, planned)
        except Exception as exc:
            outcomes, error = [exc] * len(planned), error or exc
        with self._lock:
            for (n, key, _, _), outcome in zip(planned, outcomes, strict=True):
                self._policy.unpin(key)
                if isinstance(outcome, Exception):
                    self._policy.remove(key)
                    if key in old_sizes:  # a failed replacement leaves the old object
                        self._policy.insert(key, old_sizes[key])
                    error = error or outcome
                else:
                    stored[n] = True
                    existing += not outcome
        return PutResult(stored, evicted, error, existing)

    def _remove(self, key: ChunkKey) -> Exception | None:
        try:
            self.client.delete(self.object_name(key))
        except Exception as exc:
            return exc
        return None

    def _put_one(self, item: tuple[int, ChunkKey, Blob, bool]) -> Exception | bool:
        """Whether the chunk was sent (False: another writer's copy was there), or what
        failed."""
        _, key, blob, replace = item
        try:
            return self._upload(key, blob, replace)
        except Exception as exc:
            return exc

    def _upload(self, key: ChunkKey, blob: Blob, replace: bool) -> bool:
        """PUT the chunk; a key this tier did not know is only written if no other writer's
        copy is there (that copy is then kept, counted in :attr:`skipped`: False)."""
        name, body = self.object_name(key), memoryview(blob)
        with self._lock:
            self._misses.pop(key, None)
        sent = self.client.put(name, body) if replace else self._put_new(name, body)
        self._count(uploads=int(sent), skipped=int(not sent))
        return sent

    def _put_new(self, name: str, body: memoryview | bytes) -> bool:
        """PUT ``name`` only if no object has that name (``If-None-Match: *``; a HEAD first
        on a store that refuses it): whether it was written."""
        if self._conditional:
            try:
                return self.client.put(name, body, only_new=True)
            except S3Error as exc:
                if exc.status not in (400, 501) or exc.code not in ("NotImplemented", ""):
                    raise
                log.warning(
                    "kvtier: %s refuses conditional writes (%s): HEAD before each PUT instead",
                    self.client.host,
                    exc,
                )
                self._conditional = False
        if self.client.head(name) is not None:
            return False
        return self.client.put(name, body)

    def _count(self, uploads: int = 0, skipped: int = 0) -> None:
        with self._lock:
            self.uploads += uploads
            self.skipped += skipped

    def delete(self, key: ChunkKey) -> bool:
        if self.read_only:
            raise PermissionError(f"s3 tier {self.name!r} is read-only")
        name = self.object_name(key)
        self._forget(key)
        held = self.client.head(name) is not None
        if held:
            self.client.delete(name)
        return held

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.pin(key)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._policy.unpin(key)

    def scan(self) -> Iterator[ChunkKey]:
        for key, _, _ in self._listing():
            yield key

    def header_of(self, key: ChunkKey, nbytes: int) -> bytes | None:
        """The first ``nbytes`` of a stored chunk (a ranged GET), for inspection."""
        return self.client.get_range(self.object_name(key), nbytes)

    def read_record(self, name: str) -> bytes | None:
        data = self.client.get(self._records + record_name(name))
        return None if data is None else bytes(data)

    def write_record(self, name: str, value: bytes, only_new: bool = False) -> bool:
        if self.read_only:
            raise PermissionError(f"s3 tier {self.name!r} is read-only")
        object_name = self._records + record_name(name)
        if only_new:
            return self._put_new(object_name, value)
        return self.client.put(object_name, value)

    def delete_record(self, name: str) -> bool:
        if self.read_only:
            raise PermissionError(f"s3 tier {self.name!r} is read-only")
        object_name = self._records + record_name(name)
        held = self.client.head(object_name) is not None
        if held:
            self.client.delete(object_name)
        return held

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(len(self._policy), self._policy.used_bytes, self.capacity)

    def owner_usage(self) -> dict[Hashable, OwnerUsage]:
        return {}  # no quotas on the object tier (yet): its bound is the tier's

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
