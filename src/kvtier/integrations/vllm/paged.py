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

from kvtier.errors import ConfigError

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


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first block id, length) of each run of consecutive block ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, block, 1))
    return runs


def _as_blocks(chunk: torch.Tensor, block_size: int, first: int, count: int) -> torch.Tensor:
    """Blocks ``[first, first + count)`` of a chunk ``(layers, 2, chunk, heads, dim)`` as a
    ``(layers, count, 2, block_size, heads, dim)`` view."""
    layers, two, _, heads, dim = chunk.shape
    part = chunk[:, :, first * block_size : (first + count) * block_size]
    return part.view(layers, two, count, block_size, heads, dim).transpose(1, 2)


def gather_chunks(
    layers: Sequence[torch.Tensor], block_ids: Sequence[int], dests: Sequence[torch.Tensor]
) -> None:
    """Copy whole blocks into chunks: ``dests[c]`` is a ``(layers, 2, tokens, heads, dim)``
    tensor (a host buffer, say the payload of an encoded chunk; the last may be a tail, shorter
    than the others); ``block_ids`` list the blocks of those chunks in token order. ``layers``
    are :func:`block_view` views.

    One copy per layer and run of consecutive blocks, straight from the cache to ``dests``.
    """
    block_size = layers[0].shape[2] if layers else 1
    counts = [dest.shape[2] // block_size for dest in dests]
    if len(block_ids) != sum(counts):
        raise ValueError(f"{len(dests)} chunks of {counts} blocks got {len(block_ids)} blocks")
    at = 0
    for dest, count in zip(dests, counts, strict=True):
        for pos, first, run in _runs(block_ids[at : at + count]):
            view = _as_blocks(dest, block_size, pos, run)
            for li, layer in enumerate(layers):
                view[li].copy_(layer[first : first + run])
        at += count


def blocks_to_chunks(
    layers: Sequence[torch.Tensor], block_ids: Sequence[int], chunk_tokens: int
) -> torch.Tensor:
    """Gather whole blocks into a new ``(n_chunks, layers, 2, chunk, heads, dim)`` host tensor
    (see :func:`gather_chunks`)."""
    _, _, block_size, heads, dim = layers[0].shape
    n_chunks = len(block_ids) // (chunk_tokens // block_size)
    out = torch.empty((n_chunks, len(layers), 2, chunk_tokens, heads, dim), dtype=layers[0].dtype)
    gather_chunks(layers, block_ids, list(out))
    return out


def chunks_to_blocks(
    chunks: torch.Tensor | Sequence[torch.Tensor],
    layers: Sequence[torch.Tensor],
    block_ids: Sequence[int],
    skip_blocks: int = 0,
) -> None:
    """Scatter chunks ``(layers, 2, tokens, heads, dim)`` into the paged cache.

    ``layers`` are :func:`block_view` views; ``block_ids`` are the blocks of those chunks in
    token order, possibly fewer than the chunks hold (the last chunk used in part; it may also
    be a tail, shorter than the others); the first ``skip_blocks`` of them are left alone
    (already computed).
    """
    if len(chunks) == 0:
        return
    block_size = layers[0].shape[2]
    per_chunk = chunks[0].shape[2] // block_size
    device = layers[0].device
    dests: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for c, chunk in enumerate(chunks):
        own = chunk.shape[2] // block_size
        lo, hi = max(skip_blocks, c * per_chunk), min(len(block_ids), c * per_chunk + own)
        if lo >= hi:
            continue
        src = chunk.to(device, non_blocking=True)
        for pos, first, count in _runs(block_ids[lo:hi]):
            view = _as_blocks(src, block_size, lo - c * per_chunk + pos, count)
            for li, layer in enumerate(layers):
                dests.append(layer[first : first + count])
                sources.append(view[li])
    # One call for every copy: each torch call lets go of the GIL and must take it back, which
    # a background load waits for (up to 5 ms a time) while the engine's thread runs Python:
    # 210 separate copies of a 7-chunk load took 1.4 s that way instead of 27 ms.
    if dests:
        torch._foreach_copy_(dests, sources, non_blocking=True)
