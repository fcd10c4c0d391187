"""Worker side of the vLLM connector: loading chunks from kvtier's tiers into vLLM's paged
blocks, before the forward pass (a load the step waits for) or in the background (a request
that waits in WAITING_FOR_REMOTE_KVS while other requests keep running).

A load copies each chunk once, from where it is held into vLLM's blocks: a chunk in kvtier's
DRAM is scattered straight from the tier's memory, and a chunk on disk or in Redis is read into
a buffer that becomes its DRAM copy (the promotion) and is scattered from there (int4r: decoded
straight into the blocks). One store read hands each chunk on as soon as it is verified
(:class:`kvtier.results.OnRead`): a reader thread reads a chunk, verifies it and places it while
the others read theirs, so the device is never idle while a piece of chunks waits for its
slowest read (an int4r 5,000-token disk hit through the loader alone: 64-69 ms in pieces of
four, 58-62 ms so, 2-core Xeon). Each kind of load has its own readers, so a load before the
forward pass never queues behind a long one in the background.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import torch

from kvtier import quant, quant4
from kvtier.codec import KVChunk
from kvtier.deferred import PayloadCheck, StoredForm
from kvtier.integrations.vllm.messages import LoadSpec
from kvtier.integrations.vllm.paged import TORCH_DTYPES, PagedLayer, chunks_to_blocks
from kvtier.keys import ChunkKey, Namespace
from kvtier.native import xxh3
from kvtier.results import OnRead
from kvtier.store import TieredStore
from kvtier.threads import any_core, load_priority, on_each

log = logging.getLogger("kvtier")

# Threads of a load that verify, decode and copy what was read (a DRAM hit: copy). With two,
# when each also read, the device idled while both decoded: an int8 5,000-token disk hit through
# kvtier serve took 0.212 s, 0.177 with four (bench ttft, 2-core Xeon).
READS = 4
# Threads of a load that only read from the tiers below DRAM, handing each chunk to the threads
# above: the device always has a read in flight. When four threads each read a chunk and then
# decoded it, their reads went out in waves of four, ended together, and the device idled
# while all four decoded. Served k8v4 5,000-token disk loads, the two run in turns: 59 and
# 63 ms (medians of 8) that way, 53.5 and 50.5 with two threads that only read (2-core Xeon).
# One thread reads about as fast as four here; two keep a read in flight while the other
# finishes its last one.
READ_AHEAD = 2

# Chunks are viewed as tensors where they are held, read-only memory included (a DRAM chunk is
# immutable bytes): they are only ever copied from, which torch's warning is not about.
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)


class Loader:
    """Loads :class:`LoadSpec` s into the paged cache ``layers`` (``block_view`` views).

    Blocks that could not be loaded are collected for vLLM to recompute
    (:meth:`failed_blocks`); background loads that ended, loaded or not, are reported once
    by :meth:`finished`, after their failed blocks.
    """

    def __init__(
        self,
        store: TieredStore,
        layers: list[PagedLayer],
        chunk_tokens: int,
        namespace: Callable[[str | None], Namespace],
        before_read: Callable[[list[ChunkKey]], None],
        whole_blocks: bool = False,
    ) -> None:
        self._store = store
        self._whole_blocks = whole_blocks  # a packed cache: a tail is its whole last blocks
        self._layers = layers
        self._chunk = chunk_tokens
        self._block = layers[0].block_size
        self._namespace = namespace
        self._before_read = before_read  # waits for saves of these keys still in flight
        self._dtype = layers[0].dtype
        self._now = ThreadPoolExecutor(READS, "kvtier-load", initializer=_load_thread)
        self._later = ThreadPoolExecutor(READS, "kvtier-async-read", initializer=_background_thread)
        self._io = {
            id(self._now): ThreadPoolExecutor(READ_AHEAD, "kvtier-io", initializer=_load_thread),
            id(self._later): ThreadPoolExecutor(
                READ_AHEAD, "kvtier-async-io", initializer=_background_thread
            ),
        }
        self._background = ThreadPoolExecutor(
            1, thread_name_prefix="kvtier-async-load", initializer=_background_thread
        )
        self._lock = threading.Lock()
        self._failed: set[int] = set()
        self._finished: set[str] = set()
        self._reports: list[dict[str, Any]] = []

    def warm(self) -> None:
        """Run the codecs' one-time checks now (the C kernels against torch, xxh3's library)
        and start the reader threads, each with its read buffers, as the engine starts,
        rather than in the first hit that needs them."""
        quant.native_int8()
        quant4.native_int4r()
        xxh3.available()
        for readers in (self._now, self._later):
            on_each(readers, READS, _started)
            on_each(self._io[id(readers)], READ_AHEAD, self._store.warm_thread)  # read buffers

    def chunk_shape(self, tokens: int | None = None) -> tuple[int, int, int, int, int]:
        """Shape of a chunk (or a tail of ``tokens`` tokens) of this cache. A packed cache's
        blocks have no per-token view: its tail holds its last block whole, the slots after
        its tokens included (vLLM writes its own tokens over them; they are never read
        before)."""
        heads, dim = self._layers[0].token_shape()
        slots = tokens or self._chunk
        if self._whole_blocks:
            slots = -(-slots // self._block) * self._block
        return (len(self._layers), 2, slots, heads, dim)

    def chunk_bytes(self) -> int:
        """KV bytes of a whole chunk of this cache."""
        return int(self._dtype.itemsize * torch.Size(self.chunk_shape()).numel())

    def load(self, spec: LoadSpec) -> None:
        """Load now: the forward pass about to run needs these blocks."""
        failed = self._run(spec, self._now)
        with self._lock:
            self._failed.update(failed)

    def start(self, spec: LoadSpec) -> None:
        """Load in the background; :meth:`finished` reports the request when it is done."""

        def run() -> None:
            failed = spec.block_ids[spec.start // self._block :]  # all, unless _run returns
            try:
                failed = self._run(spec, self._later)
            finally:
                with self._lock:  # failed blocks are reported no later than the request
                    self._failed.update(failed)
                    self._finished.add(spec.req_id)

        self._background.submit(run)

    def finished(self) -> set[str]:
        """Requests whose background load ended since the last call."""
        with self._lock:
            done, self._finished = self._finished, set()
        return done

    def reports(self) -> list[dict[str, Any]]:
        """What each load since the last call read: ``{"request", "loaded": {tier: tokens},
        "load_s", "failed_tokens"}``, for the request's log line."""
        with self._lock:
            done, self._reports = self._reports, []
        return done

    def failed_blocks(self) -> set[int]:
        """Blocks that were to be loaded and were not, since the last call."""
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    def _run(self, spec: LoadSpec, reader: ThreadPoolExecutor) -> list[int]:
        """Load ``spec``, reading on ``reader``; the blocks that were not loaded."""
        namespace = self._namespace(spec.salt)
        keys = self._store.keys(spec.tokens, namespace, spec.tail)
        first_chunk = spec.start // self._chunk
        n_chunks = len(keys) - first_chunk
        per_chunk = self._chunk // self._block
        skip = (spec.start - first_chunk * self._chunk) // self._block
        blocks = spec.block_ids[first_chunk * per_chunk :]  # blocks of the chunks read, to end
        shapes = [self.chunk_shape()] * n_chunks
        if spec.tail:  # the last chunk is a short one
            shapes[-1] = self.chunk_shape(len(spec.tokens) % self._chunk)
        nbytes = [self._dtype.itemsize * torch.Size(s).numel() for s in shapes]
        loaded, tiers = 0, []
        placed: dict[int, bool] = {}  # chunk (from first_chunk) -> copied into its blocks
        mismatched: set[int] = set()  # chunks whose payload did not hash to their checksum
        started = time.perf_counter()

        def place(j: int, chunk: KVChunk, check: PayloadCheck | StoredForm | None) -> None:
            """Copy chunk ``j``, just read and verified, into its blocks (int4r: decoded into
            them), on the thread that read it, while the other readers read on."""
            if (view := self._tensor(chunk, shapes[j])) is None:
                placed[j] = False  # of another shape: the run ends there
                return
            placed[j] = (
                chunks_to_blocks(
                    [view],
                    self._layers,
                    blocks[j * per_chunk : (j + 1) * per_chunk],
                    skip_blocks=max(0, skip - j * per_chunk),
                    checks=[check],
                )
                == 1
            )
            if not placed[j]:
                mismatched.add(j)

        try:
            self._before_read(keys)  # saved a step ago?
            result = self._store.get(
                spec.tokens,
                namespace,
                first_chunk,
                tail=spec.tail,
                payload_bytes=nbytes,
                check_payload=False,  # DRAM chunks: hashed as they are copied
                stored_forms=True,  # int4r chunks: decoded straight into their blocks
                on_read=OnRead(place, reader, self._io[id(reader)]),
            )
            while loaded < len(result.chunks) and placed.get(loaded):
                loaded += 1
            tiers = result.tiers[:loaded]
            for j in sorted(mismatched):  # recomputed; the copy is removed from its tier
                if j < len(result.tiers):
                    key = keys[first_chunk + j]
                    reason = "payload checksum mismatch while loading"
                    self._store.corrupt(result.tiers[j], key, reason)
        except Exception:  # never let the cache fail the request: recompute instead
            log.exception("kvtier: load failed; vLLM will recompute")
            loaded, tiers = 0, []
        took = 1000 * (time.perf_counter() - started)
        per_tier: dict[str, int] = {}
        for i, tier in enumerate(tiers):  # the tokens of [start, end) each chunk gave
            lo = max(spec.start, (first_chunk + i) * self._chunk)
            hi = min(spec.end, (first_chunk + i + 1) * self._chunk)
            per_tier[tier] = per_tier.get(tier, 0) + max(hi - lo, 0)
        got = sum(per_tier.values())
        report = {
            "request": spec.req_id,
            "loaded": per_tier,
            "load_s": round(took / 1000, 6),
            "failed_tokens": spec.end - spec.start - got,
        }
        with self._lock:
            self._reports.append(report)
        if tiers:
            where = ", ".join(f"{tiers.count(t)} chunks from {t}" for t in dict.fromkeys(tiers))
            tokens = min(spec.end, (first_chunk + loaded) * self._chunk) - spec.start
            how = "in the background " if reader is self._later else ""
            log.info(
                "request %s: loaded %d tokens (%s) %sin %.0f ms",
                *(spec.req_id, tokens, where, how, took),
            )
        return list(blocks[max(loaded * per_chunk, skip) :])

    def _tensor(self, chunk: KVChunk, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The chunk's KV as a tensor viewing its memory, or None if it is not of ``shape``."""
        if tuple(chunk.shape) != shape or chunk.dtype != TORCH_DTYPES.get(self._dtype):
            log.warning(
                "kvtier: a stored chunk is %s %s, this cache needs %s %s; recomputing from it",
                *(chunk.dtype, chunk.shape, TORCH_DTYPES.get(self._dtype), shape),
            )
            return None
        return torch.frombuffer(chunk.data, dtype=self._dtype).view(shape)

    def close(self) -> None:
        """Wait for background loads, then stop the threads."""
        self._background.shutdown(wait=True)
        for pool in (self._now, self._later, *self._io.values()):
            pool.shutdown(wait=True)


def _started() -> None:
    """Nothing: a task that starts a pool's thread."""


def _load_thread() -> None:
    any_core()
    _one_compute_thread()


def _background_thread() -> None:
    _load_thread()
    load_priority()


def _one_compute_thread() -> None:
    """Have torch copy on the calling thread alone.

    With OpenMP, a torch op called from a thread of kvtier's runs a team of its own, as many
    threads as cores, beside the engine's: the two teams' spinning barriers then fight for
    the same cores and the engine's steps stretch (a background load's copies made a
    stream's steps 3x slower here). OpenMP's thread count is per calling thread: set it
    for this one only, after torch has applied its own setting to it.
    """
    torch.get_num_threads()
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).omp_set_num_threads(1)
