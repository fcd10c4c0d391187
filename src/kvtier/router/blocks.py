"""What vLLM itself holds: its KV events, turned into kvtier chunk keys for the router's index.

``kvtier serve`` starts vLLM with ``--kv-events-config`` (a ZMQ publisher on a free port, named
in ``/kvtier/info`` as ``kv_events``). vLLM announces every block of its own KV cache it fills
(``BlockStored``: block hashes, the parent's hash, token ids) and every block it evicts
(``BlockRemoved``, by hash). vLLM's block hashes are its own; the router needs kvtier's chunk
keys, so :class:`BlockKeys` follows each block's chain from its parent: the key of the chunk a
block completes, or the tail key of the partial chunk it ends (kvtier keys tails per block,
see :mod:`kvtier.keys`). A block that goes takes with it the keys of the chunk it is part of.

A block whose parent was never announced (the router started after it, or an event was lost)
cannot be keyed: it is counted in ``unkeyed`` and left out, so the index under-reports what
vLLM holds, never over-reports it. Multimodal and LoRA blocks are left out the same way.

Messages are ``[topic, 8-byte big-endian sequence number, msgpack batch]``; the batch is
``[timestamp, [event, ...], ...]``, each event a map with a ``type``. A sequence number that is
not the next one means lost events (the engine's blocks are dropped from the index until they
are announced again) or a restarted engine (its cache is empty: everything is dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.keys import ChunkKey, next_chunk_key, tail_key

BLOCKS_KEPT = 1 << 20  # chains remembered per engine (vLLM's own cache holds far fewer)


@dataclass
class _Block:
    chain: ChunkKey  # key of the last full chunk before this block (the root for the first)
    pending: np.ndarray  # token ids since that chunk boundary, this block's included
    siblings: tuple[Any, ...]  # earlier blocks of the same, unfinished chunk
    keys: list[str] = field(default_factory=list)  # keys that stop holding when it goes


class BlockKeys:
    """vLLM block hashes -> kvtier chunk keys, for one engine.

    ``root(salt)``: the engine's namespace root for a request with ``cache_salt`` ``salt``
    (None without one); ``chunk_tokens``: kvtier's chunk size (a multiple of vLLM's block).
    """

    def __init__(self, root: Callable[[str | None], ChunkKey], chunk_tokens: int):
        self._root = root
        self._chunk = chunk_tokens
        self._blocks: dict[Any, _Block] = {}
        self.unkeyed = 0  # blocks announced that could not be keyed

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def stored(self, event: Mapping[str, Any]) -> list[str]:
        """The keys (hex) a ``BlockStored`` event makes resident."""
        hashes: Sequence[Any] = event.get("block_hashes") or ()
        size = int(event.get("block_size") or 0)
        tokens: Sequence[int] = event.get("token_ids") or ()
        extra: Sequence[Any] = event.get("extra_keys") or [None] * len(hashes)
        if (
            not hashes
            or size <= 0
            or self._chunk % size
            or len(tokens) != size * len(hashes)
            or event.get("lora_id") is not None
            or event.get("lora_name")
            or event.get("group_idx") not in (None, 0)
        ):
            self.unkeyed += len(hashes)
            return []
        parent = event.get("parent_block_hash")
        if parent is None:
            plain, salt = self._salt(extra[0] if extra else None)
            if not plain:
                self.unkeyed += len(hashes)
                return []
            state = _Block(self._root(salt), np.zeros(0, "<u4"), ())
        elif parent in self._blocks:
            state = self._blocks[parent]
        else:
            self.unkeyed += len(hashes)
            return []
        ids = np.asarray(tokens, dtype="<u4")
        out: list[str] = []
        for i, block in enumerate(hashes):
            if i > 0 and i < len(extra) and extra[i]:  # multimodal pieces: not ours to key
                self.unkeyed += len(hashes) - i
                break
            pending = np.concatenate([state.pending, ids[i * size : (i + 1) * size]])
            if len(pending) == self._chunk:
                key = next_chunk_key(state.chain, pending)
                hexed = key.hex()
                for sibling in state.siblings:
                    if sibling in self._blocks:
                        self._blocks[sibling].keys.append(hexed)
                state = _Block(key, np.zeros(0, "<u4"), (), [hexed])
            else:
                hexed = tail_key(state.chain, pending).hex()
                state = _Block(state.chain, pending, (*state.siblings, block), [hexed])
            self._remember(block, state)
            out.append(hexed)
        return out

    def removed(self, hashes: Iterable[Any]) -> list[str]:
        """The keys (hex) that stop being resident when these blocks go."""
        out: list[str] = []
        for block in hashes:
            gone = self._blocks.pop(block, None)
            if gone is not None:
                out.extend(gone.keys)
        return out

    def _remember(self, block: Any, state: _Block) -> None:
        self._blocks.pop(block, None)  # re-announced: newest last, for the oldest-first trim
        self._blocks[block] = state
        if len(self._blocks) > BLOCKS_KEPT:
            del self._blocks[next(iter(self._blocks))]

    @staticmethod
    def _salt(first: Any) -> tuple[bool, str | None]:
        """(plain, cache_salt) of a first block's extra keys: the salt (None without one);
        plain is False when the block carries anything else (multimodal, embeddings)."""
        if not first:
            return True, None
        if len(first) == 1 and isinstance(first[0], str):
            return True, str(first[0]) or None
        return False, None
