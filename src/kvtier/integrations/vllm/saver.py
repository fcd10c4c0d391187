"""The worker's saves: a step's computed blocks gathered into encoded chunks at once (vLLM may
reuse the blocks after the step), then sealed and written to the tiers off the engine's
critical path, or inline (``write_through``: a prefill engine's answer must not leave before
the shared tier holds its prompt)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvtier import codec
from kvtier.integrations.vllm.chunk_pool import ChunkPool
from kvtier.integrations.vllm.messages import SaveSpec
from kvtier.integrations.vllm.paged import PagedLayer, gather_chunks
from kvtier.keys import ChunkKey, Namespace
from kvtier.store import TieredStore
from kvtier.threads import background_priority

log = logging.getLogger("kvtier")


class Saver:
    """Saves of one worker. ``announce(keys)`` is called for each save as soon as its chunks
    are gathered, before they are stored: a load of one of those keys waits for the save
    (:meth:`wait`); a save that fails makes that load a miss, which vLLM recomputes."""

    def __init__(
        self,
        store: TieredStore,
        pool: ChunkPool,
        namespace: Callable[[str | None], Namespace],
        block_size: int,
        kv_dtype: str,
        write_through: bool,
        announce: Callable[[Sequence[ChunkKey]], None],
    ):
        self._store, self._pool, self._namespace = store, pool, namespace
        self._chunk = store.chunk_tokens
        self._block_size = block_size
        self._kv_dtype = kv_dtype
        self._write_through = write_through
        self._announce = announce
        self._layers: Sequence[PagedLayer] = ()
        self._saves = True
        self._shape: Callable[[int], tuple[int, ...]] | None = None
        self._runs = 0
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="kvtier-save", initializer=background_priority
        )
        self._pending: Future[None] | None = None
        self._saving: set[ChunkKey] = set()  # keys of chunks gathered and not yet stored
        self._lock = threading.Lock()
        self._took: list[float] = []  # seconds from gathered to stored, since took()

    def bind(
        self,
        layers: Sequence[PagedLayer],
        shape: Callable[[int], tuple[int, ...]],
        saves: bool = True,
        runs: int = 0,
    ) -> None:
        """The KV cache's layers (block views) and the shape of a tail of n tokens; with
        ``saves`` False, :meth:`save` does nothing (no tier can hold a chunk). ``runs``: the
        chunks' K and V runs (:attr:`kvtier.chunk.KVChunk.runs`), in a tail's header too."""
        self._layers, self._shape, self._saves = layers, shape, saves
        self._runs = runs

    def save(self, specs: Sequence[SaveSpec]) -> None:
        if not self._saves:
            return
        per_chunk = self._chunk // self._block_size
        for spec in specs:
            blocks = spec.block_ids[spec.first_chunk * per_chunk :]
            if not blocks:
                continue
            try:
                namespace = self._namespace(spec.salt)
                keys = self._store.keys(spec.tokens, namespace, spec.tail)[spec.first_chunk :]
                ns_id = namespace.id(self._chunk)
                blobs = [self._pool.take(k, ns_id) for k in keys]
                if spec.tail:  # a tail is shorter than the pool's chunks
                    assert self._shape is not None, "bind() first"
                    shape = self._shape(len(spec.tokens) % self._chunk)
                    blobs[-1] = codec.blank(keys[-1], self._kv_dtype, shape, ns_id, runs=self._runs)
                gather_chunks(self._layers, blocks, [self._payload(b) for b in blobs])
                began = time.perf_counter()
            except Exception:  # a failed save is a future miss, never a failed request
                log.exception("kvtier: saving request %s failed", spec.req_id)
                continue
            with self._lock:
                self._saving.update(keys)
            # Announced now, with this step's output: the scheduler in another process would
            # otherwise learn of them only after the next step, and a request scheduled
            # meanwhile (the same prompt again) would miss them.
            self._announce(keys)
            if self._write_through:  # before this step's output (the answer) leaves
                self.wait()
                self._write(spec, keys, blobs, began, through=True)
            else:
                self._pending = self._executor.submit(self._write, spec, keys, blobs, began)

    def _payload(self, blob: codec.SealedChunk) -> torch.Tensor:
        raw = torch.frombuffer(codec.payload_of(blob), dtype=torch.uint8)
        return raw.view(self._layers[0].dtype).view(codec.read_header(blob).shape)

    def _write(
        self,
        spec: SaveSpec,
        keys: list[ChunkKey],
        blobs: list[codec.SealedChunk],
        began: float,
        through: bool = False,
    ) -> None:
        try:
            for blob in blobs:
                codec.seal(blob)
            namespace = self._namespace(spec.salt)
            self._store.put_encoded(
                spec.tokens, namespace, blobs, spec.first_chunk, spec.tail, through
            )
            with self._lock:
                self._took.append(time.perf_counter() - began)
        except Exception:  # a failed save is a future miss, never a failed request
            log.exception("kvtier: saving request %s failed", spec.req_id)
        finally:
            with self._lock:
                self._saving.difference_update(keys)

    def last_write(self) -> Future[None] | None:
        """The last save's write (writes run in order: done, every earlier one is), or None
        when none is pending."""
        return self._pending

    def took(self) -> list[float]:
        """How long each save finished since the last call took: from its chunks gathered to
        the top tier holding them and the lower ones queued (holding them, write-through)."""
        with self._lock:
            took, self._took = self._took, []
        return took

    def saving(self) -> bool:
        """Whether chunks are gathered and not yet stored (a save is under way)."""
        with self._lock:
            return bool(self._saving)

    def wait(self, keys: Sequence[ChunkKey] | None = None) -> None:
        """Wait for pending saves: all of them, or only if one holds any of ``keys``."""
        if keys is not None:
            with self._lock:
                if self._saving.isdisjoint(keys):
                    return
        pending = self._pending
        if pending is not None:
            pending.result()
            if self._pending is pending:
                self._pending = None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
