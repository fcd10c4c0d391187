"""Moving KV between kvtier's chunk layout and an engine's paged KV cache (torch only).

kvtier chunk: ``(layers, 2, chunk_tokens, kv_heads, head_dim)``, K before V.
Paged cache (vLLM CPU, one tensor per layer): ``(num_blocks, kv_heads, block_size,
2 * head_dim)``, K in the first half of the last dim, V in the second.

A chunk spans ``chunk_tokens // block_size`` whole blocks; both directions work on whole
blocks, one ``index_copy_`` / ``index_select`` per layer for a whole run of chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def blocks_to_chunks(
    layers: Sequence[torch.Tensor], block_ids: Sequence[int], block_size: int, chunk_tokens: int
) -> torch.Tensor:
    """Gather whole blocks into chunks: returns ``(n_chunks, layers, 2, chunk, heads, dim)``.

    ``block_ids`` lists the blocks of the chunks in token order (a multiple of
    ``chunk_tokens // block_size`` of them).
    """
    per_chunk = chunk_tokens // block_size
    n_chunks = len(block_ids) // per_chunk
    first = layers[0]
    _, heads, _, two_dim = first.shape
    dim = two_dim // 2
    index = torch.as_tensor(list(block_ids), dtype=torch.long, device=first.device)
    out = torch.empty(
        (n_chunks, len(layers), 2, chunk_tokens, heads, dim), dtype=first.dtype, device="cpu"
    )
    for li, layer in enumerate(layers):
        picked = layer.index_select(0, index)  # (nb, heads, block, 2*dim)
        picked = picked.view(n_chunks, per_chunk, heads, block_size, 2, dim)
        # -> (n_chunks, 2, per_chunk, block, heads, dim) = (n_chunks, 2, chunk, heads, dim)
        out[:, li] = picked.permute(0, 4, 1, 3, 2, 5).reshape(n_chunks, 2, chunk_tokens, heads, dim)
    return out


def chunks_to_blocks(
    chunks: torch.Tensor,
    layers: Sequence[torch.Tensor],
    block_ids: Sequence[int],
    block_size: int,
    skip_blocks: int = 0,
) -> None:
    """Scatter ``chunks`` ``(n_chunks, layers, 2, chunk, heads, dim)`` into the paged cache.

    ``block_ids`` are the blocks of those chunks in token order; the first ``skip_blocks`` of
    them are left alone (already computed by the engine).
    """
    n_chunks, n_layers, _, chunk_tokens, heads, dim = chunks.shape
    per_chunk = chunk_tokens // block_size
    index = torch.as_tensor(list(block_ids)[skip_blocks:], dtype=torch.long)
    for li in range(n_layers):
        src = chunks[:, li].reshape(n_chunks, 2, per_chunk, block_size, heads, dim)
        # -> (n_chunks, per_chunk, heads, block, 2, dim) = (blocks, heads, block, 2*dim)
        src = src.permute(0, 2, 4, 3, 1, 5).reshape(
            n_chunks * per_chunk, heads, block_size, 2 * dim
        )
        layer = layers[li]
        layer.index_copy_(0, index.to(layer.device), src[skip_blocks:].to(layer.device))
