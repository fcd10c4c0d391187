"""Chunk layout <-> vLLM's paged KV blocks: exact round trips, partial loads."""

from __future__ import annotations

import torch

from kvtier.integrations.paged import blocks_to_chunks, chunks_to_blocks

LAYERS, HEADS, BLOCK, DIM = 3, 2, 4, 5


def cache() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(12, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]


def test_gather_puts_k_then_v_of_each_token_in_chunk_layout() -> None:
    layers = cache()
    block_ids = [7, 2, 5, 0]  # two chunks of 8 tokens, two blocks each
    chunks = blocks_to_chunks(layers, block_ids, BLOCK, 8)
    assert chunks.shape == (2, LAYERS, 2, 8, HEADS, DIM)
    # token 5 of chunk 0 sits in the chunk's second block (id 2), offset 1
    assert torch.equal(chunks[0, 1, 0, 5], layers[1][2, :, 1, :DIM])
    assert torch.equal(chunks[0, 1, 1, 5], layers[1][2, :, 1, DIM:])
    assert torch.equal(chunks[1, 2, 1, 3], layers[2][5, :, 3, DIM:])


def test_scatter_round_trips_and_leaves_skipped_blocks_alone() -> None:
    layers = cache()
    block_ids = [7, 2, 5, 0]
    chunks = blocks_to_chunks(layers, block_ids, BLOCK, 8)
    target = [torch.zeros_like(t) for t in layers]
    chunks_to_blocks(chunks, target, block_ids, BLOCK, skip_blocks=1)
    for src, dst in zip(layers, target, strict=True):
        assert torch.equal(dst[[2, 5, 0]], src[[2, 5, 0]])
        assert not dst[7].any()  # the engine computed that block itself
        assert not dst[[1, 3, 4, 6]].any()  # nothing else touched
