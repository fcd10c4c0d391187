"""Placing chunks in vLLM's AMX-packed CPU cache through address tables.

A packed cache is moved as whole blocks (:mod:`kvtier.integrations.vllm.paged`): a chunk holds,
per layer, its blocks' bytes one after the other, so each of its copies is a run of
consecutive blocks of one layer, whose addresses follow from the block ids alone. They are
computed here as arrays, for the C copies and decoders, without a torch view per copy: the 30
views of a 30-layer chunk cost 0.15 ms alone, and up to 5 ms while three other reader threads
decode on two cores (each view's Python waits for a core and the GIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvtier import native
from kvtier.deferred import PayloadCheck, StoredForm

Table = tuple[Any, Any, Any]  # int64 arrays: destination addresses, source addresses, sizes


def takes(layers: Sequence[Any]) -> bool:
    """Whether :func:`place` moves chunks into these layers: a packed cache on the host,
    where kvtier's C kernels are built."""
    return bool(layers) and layers[0].blocks is not None and native.library() is not None


def fits(chunks: Sequence[torch.Tensor], layers: Sequence[Any]) -> bool:
    """Whether each chunk is what :func:`place` can move as bytes: contiguous, on the host, of
    the cache's dtype, and holding whole blocks of every layer (else the caller's torch copies
    convert or refuse it)."""
    block, row = layers[0].block_size, layers[0].blocks.shape[1]
    return all(
        c.device.type == "cpu"
        and c.dtype == layers[0].dtype
        and c.is_contiguous()
        and c.dim() == 5
        and c.shape[0] == len(layers)
        and c.shape[2] % block == 0
        and c.numel() // len(layers) == c.shape[2] // block * row
        for c in chunks
    )


def table(chunk: torch.Tensor, layers: Sequence[Any], block_ids: Sequence[int], at: int) -> Table:
    """The copies between ``chunk`` (its blocks from position ``at`` within it) and the packed
    cache's blocks ``block_ids``: one per layer and run of consecutive block ids, in the
    chunk's byte order."""
    block = layers[0].block_size
    if chunk.shape[2] % block:
        raise ValueError(f"a packed cache's chunk of {chunk.shape[2]} tokens is not whole blocks")
    item = chunk.element_size()
    row = layers[0].blocks.shape[1] * item  # one block of one layer
    layer_bytes = chunk[0].numel() * item
    moves = np.array(runs(block_ids), dtype=np.int64).reshape(-1, 3)  # (position, first, count)
    bases = np.array([layer.blocks.data_ptr() for layer in layers], dtype=np.int64)
    dst = bases[:, None] + moves[None, :, 1] * row
    src = (
        chunk.data_ptr()
        + np.arange(len(layers), dtype=np.int64)[:, None] * layer_bytes
        + (at + moves[None, :, 0]) * row
    )
    sizes = np.broadcast_to(moves[None, :, 2] * row, dst.shape)
    return tuple(np.ascontiguousarray(a.ravel(), dtype=np.int64) for a in (dst, src, sizes))  # type: ignore[return-value]


def place(
    chunks: Sequence[torch.Tensor],
    layers: Sequence[Any],
    block_ids: Sequence[int],
    skip_blocks: int,
    checks: Sequence[PayloadCheck | StoredForm | None],
) -> int:
    """:func:`kvtier.integrations.vllm.paged.chunks_to_blocks` into a packed cache on the
    host (:func:`takes`), of chunks that :func:`fits`: each chunk copied, hashed as it is
    copied or decoded into its blocks, as that function says."""
    block = layers[0].block_size
    for c, chunk in enumerate(chunks):
        own = chunk.shape[2] // block
        base = c * (chunks[0].shape[2] // block)
        lo, hi = max(skip_blocks, base), min(len(block_ids), base + own)
        copies = table(chunk, layers, block_ids[lo:hi], lo - base) if lo < hi else None
        if not _place_one(chunk, copies, checks[c] if c < len(checks) else None):
            return c
    return len(chunks)


def _place_one(
    chunk: torch.Tensor, copies: Table | None, check: PayloadCheck | StoredForm | None
) -> bool:
    """Copy (or decode) one chunk; False where its check fails or its form does not fit."""
    if isinstance(check, StoredForm):
        if not check.fits(chunk):
            return False
        if copies is None:  # none of its blocks wanted
            return True
        dst, src, sizes = copies
        table = (dst, src - chunk.data_ptr(), sizes)  # the kernel takes payload offsets
        return check.place(chunk, table, lambda: native.copy_table(copies))
    if copies is None:  # none of its blocks wanted: only its check
        return check is None or check.holds()
    if check is None:
        return native.copy_table(copies)
    digest = native.copy_hash_table(copies, check.prefix, check.payload)
    if digest is None:  # copies that do not cover the payload in order: hash, then copy
        return check.holds() and native.copy_table(copies)
    return check.holds(digest)


def runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first block id, length) of each run of consecutive block ids."""
    out: list[tuple[int, int, int]] = []
    for pos, block in enumerate(block_ids):
        if out and out[-1][1] + out[-1][2] == block:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((pos, block, 1))
    return out
