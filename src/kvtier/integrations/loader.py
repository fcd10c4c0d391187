"""Worker side of the vLLM connector: loading chunks from kvtier's tiers into vLLM's paged
blocks, before the forward pass (a load the step waits for) or in the background (a request
that waits in WAITING_FOR_REMOTE_KVS while other requests keep running).

A load goes through a pair of reused host buffers: the next buffer's worth of chunks is read
(and verified) on a reader thread while the previous one is scattered into blocks. Each kind
of load has its own pair and reader, so a load before the forward pass never queues behind a
long one in the background.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass

import torch

from kvtier.integrations.paged import chunks_to_blocks
from kvtier.integrations.vllm_meta import LoadSpec
from kvtier.keys import ChunkKey, Namespace
from kvtier.results import LoadResult
from kvtier.store import TieredStore
from kvtier.threads import any_core, load_priority

log = logging.getLogger("kvtier")

STAGING_BYTES = 64 << 20  # each load buffer holds about this much


@dataclass
class _Pipeline:
    """Two staging buffers (read one, scatter the other) and the thread that reads."""

    staging: list[torch.Tensor]
    reader: ThreadPoolExecutor


class Loader:
    """Loads :class:`LoadSpec` s into the paged cache ``layers`` (``block_view`` views).

    Blocks that could not be loaded are collected for vLLM to recompute
    (:meth:`failed_blocks`); background loads that ended, loaded or not, are reported once
    by :meth:`finished`, after their failed blocks.
    """

    def __init__(
        self,
        store: TieredStore,
        layers: list[torch.Tensor],
        chunk_tokens: int,
        namespace: Callable[[str | None], Namespace],
        before_read: Callable[[list[ChunkKey]], None],
    ) -> None:
        self._store = store
        self._layers = layers
        self._chunk = chunk_tokens
        self._block = layers[0].shape[2]
        self._namespace = namespace
        self._before_read = before_read  # waits for saves of these keys still in flight
        shape = self.chunk_shape()
        chunk_bytes = layers[0].element_size() * int(torch.Size(shape).numel())
        self._pieces = max(1, STAGING_BYTES // chunk_bytes)
        self._now = self._pipeline("kvtier-load")
        self._later = self._pipeline("kvtier-async-read", _background_thread)
        self._background = ThreadPoolExecutor(
            1, thread_name_prefix="kvtier-async-load", initializer=_background_thread
        )
        self._lock = threading.Lock()
        self._failed: set[int] = set()
        self._finished: set[str] = set()

    def _pipeline(self, name: str, initializer: Callable[[], None] = any_core) -> _Pipeline:
        # Fresh pages cost more than the copy into them: the buffers are touched now, not on
        # the first hit.
        dtype = self._layers[0].dtype
        staging = [torch.zeros((self._pieces, *self.chunk_shape()), dtype=dtype) for _ in "ab"]
        return _Pipeline(staging, ThreadPoolExecutor(1, name, initializer=initializer))

    def chunk_shape(self, tokens: int | None = None) -> tuple[int, int, int, int, int]:
        """Shape of a chunk (or a tail of ``tokens`` tokens) of this cache."""
        _, _, _, heads, dim = self._layers[0].shape
        return (len(self._layers), 2, tokens or self._chunk, heads, dim)

    def load(self, spec: LoadSpec) -> None:
        """Load now: the forward pass about to run needs these blocks."""
        failed = self._run(spec, self._now)
        with self._lock:
            self._failed.update(failed)

    def start(self, spec: LoadSpec) -> None:
        """Load in the background; :meth:`finished` reports the request when it is done."""
        pipeline = self._later

        def run() -> None:
            failed = spec.block_ids[spec.start // self._block :]  # all, unless _run returns
            try:
                failed = self._run(spec, pipeline)
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

    def failed_blocks(self) -> set[int]:
        """Blocks that were to be loaded and were not, since the last call."""
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    def _run(self, spec: LoadSpec, pipe: _Pipeline) -> list[int]:
        """Load ``spec`` through ``pipe``; the blocks that were not loaded."""
        namespace = self._namespace(spec.salt)
        keys = self._store.keys(spec.tokens, namespace, spec.tail)
        first_chunk = spec.start // self._chunk
        n_chunks = len(keys) - first_chunk
        per_chunk = self._chunk // self._block
        skip = (spec.start - first_chunk * self._chunk) // self._block
        blocks = spec.block_ids[first_chunk * per_chunk :]  # blocks of the chunks read, to end
        loaded, tiers = 0, []
        started = time.perf_counter()

        def read(at: int, staging: torch.Tensor) -> tuple[list[torch.Tensor], LoadResult]:
            piece = list(staging[: n_chunks - at])
            if spec.tail and at + len(piece) == n_chunks:  # the tail is a short chunk
                piece[-1] = self._chunk_view(piece[-1], len(spec.tokens) % self._chunk)
            raw = [p.view(-1).view(torch.uint8).numpy() for p in piece]  # numpy has no bf16
            return piece, self._store.get_into(
                spec.tokens, namespace, raw, first_chunk + at, spec.tail
            )

        pending: Future[tuple[list[torch.Tensor], LoadResult]] | None = None
        try:
            self._before_read(keys)  # saved a step ago?
            pending = pipe.reader.submit(read, 0, pipe.staging[0])
            turn = 0
            while pending is not None:
                piece, result = pending.result()
                pending = None
                ahead = loaded + result.chunks
                if result.chunks == len(piece) and ahead < n_chunks:
                    turn ^= 1
                    pending = pipe.reader.submit(read, ahead, pipe.staging[turn])
                chunks_to_blocks(
                    piece[: result.chunks],
                    self._layers,
                    blocks[loaded * per_chunk : ahead * per_chunk],
                    skip_blocks=max(0, skip - loaded * per_chunk),
                )
                loaded = ahead
                tiers += result.tiers
        except Exception:  # never let the cache fail the request: recompute instead
            log.exception("kvtier: load failed; vLLM will recompute")
            if pending is not None:  # its buffer must not be written while reused
                wait([pending])
        if tiers:
            where = ", ".join(f"{tiers.count(t)} chunks from {t}" for t in dict.fromkeys(tiers))
            tokens = min(spec.end, (first_chunk + loaded) * self._chunk) - spec.start
            took = 1000 * (time.perf_counter() - started)
            how = "in the background " if pipe is self._later else ""
            log.info(
                "request %s: loaded %d tokens (%s) %sin %.0f ms",
                *(spec.req_id, tokens, where, how, took),
            )
        return list(blocks[max(loaded * per_chunk, skip) :])

    def _chunk_view(self, slot: torch.Tensor, tokens: int) -> torch.Tensor:
        """The first bytes of a chunk-sized buffer, as a chunk of ``tokens`` tokens."""
        shape = self.chunk_shape(tokens)
        return slot.view(-1)[: torch.Size(shape).numel()].view(shape)

    def close(self) -> None:
        """Wait for background loads, then stop the threads."""
        self._background.shutdown(wait=True)
        for pipe in (self._now, self._later):
            pipe.reader.shutdown(wait=True)


def _background_thread() -> None:
    any_core()
    load_priority()
    _one_compute_thread()


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
