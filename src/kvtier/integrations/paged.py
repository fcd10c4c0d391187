"""Moving KV between kvtier's chunk layout and an engine's paged KV cache (torch only).

kvtier chunk: ``(layers, 2, chunk_tokens, kv_heads, head_dim)``, K before V.

vLLM keeps one tensor per layer, laid out by its attention backend:

- CPU:             ``(num_blocks, kv_heads, block_size, 2 * head_dim)`` (K then V in the last dim)
- FlashAttention:  ``(2, num_blocks, block_size, kv_heads, head_dim)``
- FlashInfer:      ``(num_blocks, 2, block_size, kv_heads, head_dim)``

:func:`block_view` turns any of them into a ``(num_blocks, 2, block_size, kv_heads, head_dim)``
view of the same memory; gather and scatter then work on whole blocks, one
``index_select`` / ``index_copy_`` per layer for a whole run of chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_view(layer: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """A ``(num_blocks, 2, block_size, kv_heads, head_dim)`` view of one layer's cache."""
    shape = tuple(layer.shape)
    if layer.dim() == 4 and shape[1] == kv_heads and shape[3] == 2 * head_dim:  # CPU
        blocks, _, block_size, _ = shape
        return layer.view(blocks, kv_heads, block_size, 2, head_dim).permute(0, 3, 2, 1, 4)
    if layer.dim() == 5 and shape[0] == 2 and shape[3:] == (kv_heads, head_dim):  # FlashAttn
        return layer.permute(1, 0, 2, 3, 4)
    if layer.dim() == 5 and shape[1] == 2 and shape[3:] == (kv_heads, head_dim):  # FlashInfer
        return layer
    raise ValueError(
        f"unknown paged KV layout {shape} for {kv_heads} KV heads of dim {head_dim}; kvtier"
        " knows vLLM's CPU, FlashAttention and FlashInfer layouts"
    )


def blocks_to_chunks(
    layers: Sequence[torch.Tensor], block_ids: Sequence[int], chunk_tokens: int
) -> torch.Tensor:
    """Gather whole blocks into chunks: returns ``(n_chunks, layers, 2, chunk, heads, dim)``
    on the CPU. ``layers`` are :func:`block_view` views; ``block_ids`` list the blocks of the
    chunks in token order."""
    first = layers[0]
    _, _, block_size, heads, dim = first.shape
    per_chunk = chunk_tokens // block_size
    n_chunks = len(block_ids) // per_chunk
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=first.device)
    out = torch.empty((n_chunks, len(layers), 2, chunk_tokens, heads, dim), dtype=first.dtype)
    for li, layer in enumerate(layers):
        picked = layer.index_select(0, index)  # (blocks, 2, block, heads, dim)
        picked = picked.view(n_chunks, per_chunk, 2, block_size, heads, dim).transpose(1, 2)
        out[:, li] = picked.reshape(n_chunks, 2, chunk_tokens, heads, dim).to("cpu")
    return out


def chunks_to_blocks(
    chunks: torch.Tensor,
    layers: Sequence[torch.Tensor],
    block_ids: Sequence[int],
    skip_blocks: int = 0,
) -> None:
    """Scatter ``chunks`` ``(n_chunks, layers, 2, chunk, heads, dim)`` into the paged cache.

    ``layers`` are :func:`block_view` views; ``block_ids`` are the blocks of those chunks in
    token order, possibly fewer than the chunks hold (the last chunk used in part); the first
    ``skip_blocks`` of them are left alone (already computed).
    """
    n_chunks, n_layers, _, chunk_tokens, heads, dim = chunks.shape
    block_size = layers[0].shape[2]
    per_chunk = chunk_tokens // block_size
    index = torch.as_tensor(list(block_ids)[skip_blocks:], dtype=torch.long)
    for li in range(n_layers):
        src = chunks[:, li].reshape(n_chunks, 2, per_chunk, block_size, heads, dim)
        src = src.transpose(1, 2).reshape(n_chunks * per_chunk, 2, block_size, heads, dim)
        layer = layers[li]
        src = src[skip_blocks : skip_blocks + len(index)]
        layer.index_copy_(0, index.to(layer.device), src.to(layer.device, non_blocking=True))
