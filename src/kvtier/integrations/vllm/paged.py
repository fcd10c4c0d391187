"""Moving KV between kvtier's chunk layout and an engine's paged KV cache (torch only).

kvtier chunk: ``(layers, 2, chunk_tokens, kv_heads, head_dim)``, K before V, token by token.

vLLM keeps one tensor per layer, laid out by its attention backend:

- CPU (``vec``/``vec16`` kernels): ``(num_blocks, kv_heads, block_size, 2 * head_dim)`` in name
  only: per block and head, K is stored transposed, ``(head_dim, block_size)``, then V as
  ``(block_size, head_dim)`` (measured with vLLM's own ``cpu_attn_reshape_and_cache``; see
  tests/unit/test_paged.py). The ``amx`` kernel packs both into AMX tiles.
- FlashAttention:  ``(2, num_blocks, block_size, kv_heads, head_dim)``
- FlashInfer:      ``(num_blocks, 2, block_size, kv_heads, head_dim)``

:func:`block_view` turns any of them into a :class:`PagedLayer`: K and V each viewed as
``(num_blocks, block_size, kv_heads, head_dim)`` over the same memory, so a chunk holds the
same bytes whichever engine wrote it, and a block can be moved in part (a tail ending inside
it). An AMX-packed cache has no per-token view: it is moved as opaque whole blocks
(``packed``), under a layout tag of its own so that no other engine reads its chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier import native
from kvtier.deferred import PayloadCheck, StoredForm
from kvtier.errors import ConfigError
from kvtier.integrations.vllm import packed

TORCH_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def kv_dtype_name(model_dtype: object, cache_dtype: str) -> str:
    """Name of the KV cache's dtype: the model's, unless the cache dtype is set apart."""
    named = {
        "float16": "float16",
        "half": "float16",
        "bfloat16": "bfloat16",
        "float32": "float32",
        "float": "float32",
    }
    if cache_dtype not in ("auto", "None"):
        if cache_dtype not in named:
            raise ConfigError(f"kvtier stores bf16, fp16 or fp32 KV caches, not {cache_dtype}")
        return named[cache_dtype]
    if isinstance(model_dtype, torch.dtype) and model_dtype in TORCH_DTYPES:
        return TORCH_DTYPES[model_dtype]
    if str(model_dtype) in named:
        return named[str(model_dtype)]
    raise ConfigError(f"kvtier stores bf16, fp16 or fp32 KV caches, not {model_dtype}")


@dataclass(frozen=True)
class PagedLayer:
    """One layer's paged cache: K and V as ``(num_blocks, block_size, kv_heads, head_dim)``
    views of the engine's tensor."""

    k: torch.Tensor
    v: torch.Tensor
    blocks: torch.Tensor | None = None  # packed: each block's bytes, ``(num_blocks, elements)``

    @property
    def block_size(self) -> int:
        return int(self.k.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def token_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim)"""
        return int(self.k.shape[2]), int(self.k.shape[3])


def block_view(
    layer: torch.Tensor, kv_heads: int, head_dim: int, packed: bool = False
) -> PagedLayer:
    """K and V views of one layer's cache. ``packed``: the CPU layout of vLLM's AMX kernel,
    whose blocks are moved whole as opaque bytes (its K and V views are not per token)."""
    shape = tuple(layer.shape)
    if layer.dim() == 4 and shape[1] == kv_heads and shape[3] == 2 * head_dim:  # CPU
        if not layer.is_contiguous():
            raise ValueError(f"a CPU KV cache of shape {shape} that is not contiguous")
        blocks, _, block, _ = shape
        head = 2 * block * head_dim  # one head of one block: K then V
        size = (blocks, block, kv_heads, head_dim)
        at = layer.storage_offset()
        if packed:  # opaque: moved as whole blocks (K and V views give only the shape)
            strides = (kv_heads * head, 2 * head_dim, head, 1)
            k = layer.as_strided(size, strides, at)
            whole = layer.view(blocks, kv_heads * head)
            return PagedLayer(k, layer.as_strided(size, strides, at + head_dim), whole)
        k = layer.as_strided(size, (kv_heads * head, 1, head, block), at)  # K^T per head
        v = layer.as_strided(size, (kv_heads * head, head_dim, head, 1), at + block * head_dim)
        return PagedLayer(k, v)
    if layer.dim() == 5 and shape[0] == 2 and shape[3:] == (kv_heads, head_dim):  # FlashAttn
        return PagedLayer(layer[0], layer[1])
    if layer.dim() == 5 and shape[1] == 2 and shape[3:] == (kv_heads, head_dim):  # FlashInfer
        return PagedLayer(layer[:, 0], layer[:, 1])
    raise ValueError(
        f"unknown paged KV layout {shape} for {kv_heads} KV heads of dim {head_dim}; kvtier"
        " knows vLLM's CPU, FlashAttention and FlashInfer layouts"
    )


def _pairs(
    chunk: torch.Tensor,
    layers: Sequence[PagedLayer],
    block_ids: Sequence[int],
    at: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cache view, chunk view) of every copy between ``chunk`` (its blocks from position
    ``at`` within it) and the cache blocks ``block_ids``: one per layer, K/V and run of
    consecutive blocks, then one per layer and K/V for a last block the chunk holds in part.

    A packed cache's chunk holds, per layer, its blocks' bytes one after the other: one
    contiguous copy per layer and run of consecutive blocks (per token and K/V, each copy
    would move 64 values: 2.5x slower here)."""
    block = layers[0].block_size
    tokens = chunk.shape[2]
    if layers[0].blocks is not None:
        return _packed_pairs(chunk, layers, block_ids, at)
    whole = min(len(block_ids), max(tokens // block - at, 0))
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for pos, first, count in packed.runs(block_ids[:whole]):
        lo = (at + pos) * block
        for li, layer in enumerate(layers):
            heads, dim = layer.token_shape()
            for kv, cache in enumerate(layer.kv):
                part = chunk[li, kv, lo : lo + count * block]
                pairs.append((cache[first : first + count], part.view(count, block, heads, dim)))
    if whole < len(block_ids):  # a tail ending inside its last block: its tokens only
        lo = (at + whole) * block
        for li, layer in enumerate(layers):
            for kv, cache in enumerate(layer.kv):
                part = chunk[li, kv, lo:tokens]
                pairs.append((cache[block_ids[whole], : tokens - lo], part))
    return pairs


def _packed_pairs(
    chunk: torch.Tensor, layers: Sequence[PagedLayer], block_ids: Sequence[int], at: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_pairs` for a packed cache, whose chunks hold whole blocks only."""
    if chunk.shape[2] % layers[0].block_size:
        raise ValueError(f"a packed cache's chunk of {chunk.shape[2]} tokens is not whole blocks")
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for pos, first, count in packed.runs(block_ids):
        for li, layer in enumerate(layers):
            assert layer.blocks is not None
            size = layer.blocks.shape[1]
            part = chunk[li].reshape(-1, size)[at + pos : at + pos + count]
            pairs.append((layer.blocks[first : first + count], part))
    return pairs


def gather_chunks(
    layers: Sequence[PagedLayer], block_ids: Sequence[int], dests: Sequence[torch.Tensor]
) -> None:
    """Copy blocks into chunks: ``dests[c]`` is a ``(layers, 2, tokens, heads, dim)`` tensor
    (a host buffer, say the payload of an encoded chunk; the last may be a tail, shorter than
    the others and maybe ending inside a block, whose first tokens alone are copied);
    ``block_ids`` list the blocks of those chunks in token order.

    One copy per layer, K/V and run of consecutive blocks, straight from the cache to ``dests``.
    """
    block_size = layers[0].block_size if layers else 1
    counts = [-(-dest.shape[2] // block_size) for dest in dests]
    if len(block_ids) != sum(counts):
        raise ValueError(f"{len(dests)} chunks of {counts} blocks got {len(block_ids)} blocks")
    at = 0
    for dest, count in zip(dests, counts, strict=True):
        for cache, part in _pairs(dest, layers, block_ids[at : at + count], 0):
            part.copy_(cache)
        at += count


def blocks_to_chunks(
    layers: Sequence[PagedLayer], block_ids: Sequence[int], chunk_tokens: int
) -> torch.Tensor:
    """Gather whole blocks into a new ``(n_chunks, layers, 2, chunk, heads, dim)`` host tensor
    (see :func:`gather_chunks`)."""
    block_size = layers[0].block_size
    heads, dim = layers[0].token_shape()
    n_chunks = len(block_ids) // (chunk_tokens // block_size)
    out = torch.empty((n_chunks, len(layers), 2, chunk_tokens, heads, dim), dtype=layers[0].dtype)
    gather_chunks(layers, block_ids, list(out))
    return out


def chunks_to_blocks(
    chunks: torch.Tensor | Sequence[torch.Tensor],
    layers: Sequence[PagedLayer],
    block_ids: Sequence[int],
    skip_blocks: int = 0,
    checks: Sequence[PayloadCheck | StoredForm | None] = (),
) -> int:
    """Scatter chunks ``(layers, 2, tokens, heads, dim)`` into the paged cache.

    ``block_ids`` are the blocks of those chunks in token order, possibly fewer than the chunks
    hold (the last chunk used in part; it may also be a tail, shorter than the others, whose
    last block may be partial: only its tokens are written there); the first ``skip_blocks``
    of them are left alone (already computed).

    ``checks``: per chunk, the check its payload must pass (:mod:`kvtier.deferred`; None, or
    past the end: verified already). Such a chunk is hashed as it is copied where its copies
    cover its payload in order (one read of it), else hashed first. A chunk whose check is a
    ``StoredForm`` (int4r, verified) is decoded into the blocks layer by layer where the
    copies allow, else into its own buffer and copied. Returns how many leading chunks were
    placed and passed; after a chunk that did not, its blocks hold garbage and the chunks
    after it are not placed.
    """
    if len(chunks) == 0:
        return 0
    if layers[0].device.type == "cpu" and packed.takes(layers) and packed.fits(chunks, layers):
        return packed.place(chunks, layers, block_ids, skip_blocks, checks)
    block_size = layers[0].block_size
    per_chunk = -(-chunks[0].shape[2] // block_size)
    device = layers[0].device
    checks = list(checks)
    for c, check in enumerate(checks[: len(chunks)]):
        if isinstance(check, StoredForm) and device.type != "cpu":
            # decoded into its own buffer before that moves to the device
            if not _decode_to(check, chunks[c], [], device, here=True):
                chunks, checks = chunks[:c], checks[:c]
                break
            checks[c] = None
    if len(chunks) == 0:
        return 0
    copies: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for c, chunk in enumerate(chunks):
        base = c * per_chunk
        own = -(-chunk.shape[2] // block_size)
        lo, hi = max(skip_blocks, base), min(len(block_ids), base + own)
        src = chunk.to(device, non_blocking=True) if lo < hi else chunk
        copies.append(_pairs(src, layers, block_ids[lo:hi], lo - base) if lo < hi else [])
    if not any(checks):
        _copy([pair for pairs in copies for pair in pairs], device)
        return len(chunks)
    for c, pairs in enumerate(copies):
        check = checks[c] if c < len(checks) else None
        if check is None:
            _copy(pairs, device)
            continue
        if isinstance(check, StoredForm):
            if not _decode_to(check, chunks[c], pairs, device):
                return c
            continue
        digest = native.copy_hash(pairs, check.prefix, check.payload) if pairs else None
        if digest is None:  # copies that do not cover the payload in order: hash, then copy
            if not check.holds():
                return c
            _copy(pairs, device)
        elif not check.holds(digest):
            return c
    return len(chunks)


def _decode_to(
    form: StoredForm,
    chunk: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    here: bool = False,
) -> bool:
    """Place a chunk held in its stored form: decoded straight into its blocks (``pairs``'
    destinations, at their sources' offsets in ``chunk``) where they are contiguous CPU
    views, each within one layer; else decoded into ``chunk`` (its own raw-sized buffer,
    on the host) and copied (``here``: decoded there only). False where it does not decode
    or is not of ``chunk``'s shape and dtype (a corrupt chunk, or another model's)."""
    if not form.fits(chunk):
        return False
    if not pairs and not here:
        return True
    table = _scatter_table(chunk, pairs) if device.type == "cpu" and not here else None
    return form.place(chunk, table, lambda: _copy(pairs, device))


def _scatter_table(
    chunk: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[Any, Any, Any] | None:
    """(destination addresses, payload byte offsets, sizes) of ``pairs`` in payload order, for
    a decoder writing each layer's K and V at once; None where a copy is not contiguous bytes
    of the chunk's dtype within one layer."""
    import numpy as np

    base, size = chunk.data_ptr(), chunk.element_size()
    layer = chunk[0].numel() * size
    rows = []
    for dst, src in pairs:
        if not (dst.is_contiguous() and src.is_contiguous() and dst.dtype == chunk.dtype):
            return None
        offset, nbytes = src.data_ptr() - base, src.numel() * size
        if offset // layer != (offset + nbytes - 1) // layer or dst.numel() != src.numel():
            return None
        rows.append((dst.data_ptr(), offset, nbytes))
    rows.sort(key=lambda r: r[1])
    table = np.array(rows, dtype=np.int64)
    return tuple(np.ascontiguousarray(table[:, i]) for i in range(3))  # type: ignore[return-value]


def _copy(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
    """Every (cache view, chunk view) copy at once.

    One call for every copy: each torch call lets go of the GIL and must take it back, which
    a background load waits for (up to 5 ms a time) while the engine's thread runs Python:
    210 separate copies of a 7-chunk load took 1.4 s that way instead of 27 ms. In C where
    kvtier's kernels are built (CPU caches: one loop of memcpy, no GIL, no OpenMP team per
    reader thread), else in torch."""
    if pairs and not (device.type == "cpu" and native.copy_many(pairs)):
        torch._foreach_copy_(
            [dst for dst, _ in pairs], [src for _, src in pairs], non_blocking=True
        )
