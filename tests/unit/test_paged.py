"""Chunk layout <-> vLLM's paged KV blocks (CPU, FlashAttention and FlashInfer layouts)."""

from __future__ import annotations

import pytest
import torch

from kvtier.integrations.vllm.paged import (
    block_view,
    blocks_to_chunks,
    chunks_to_blocks,
    gather_chunks,
)

LAYERS, HEADS, BLOCK, DIM, NBLOCKS = 3, 2, 4, 5, 12


def make(layout: str, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shape = {
        "cpu": (NBLOCKS, HEADS, BLOCK, 2 * DIM),
        "flash_attn": (2, NBLOCKS, BLOCK, HEADS, DIM),
        "flashinfer": (NBLOCKS, 2, BLOCK, HEADS, DIM),
    }[layout]
    return [torch.randn(shape, dtype=dtype) for _ in range(LAYERS)]


def k_and_v(layout: str, layer: torch.Tensor, block: int, offset: int) -> tuple[torch.Tensor, ...]:
    """K and V (heads, dim) of one token slot, read the way each backend lays them out."""
    if layout == "cpu":
        return layer[block, :, offset, :DIM], layer[block, :, offset, DIM:]
    if layout == "flash_attn":
        return layer[0, block, offset], layer[1, block, offset]
    return layer[block, 0, offset], layer[block, 1, offset]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the engine's, per host
@pytest.mark.parametrize("layout", ["cpu", "flash_attn", "flashinfer"])
def test_gather_puts_k_then_v_of_each_token_in_chunk_layout(
    layout: str, dtype: torch.dtype
) -> None:
    raw = make(layout, dtype)
    views = [block_view(t, HEADS, DIM) for t in raw]
    chunks = blocks_to_chunks(views, [7, 2, 5, 0], 8)  # two chunks of 8 tokens, 2 blocks each
    assert chunks.shape == (2, LAYERS, 2, 8, HEADS, DIM)
    k, v = k_and_v(layout, raw[1], 2, 1)  # token 5 of chunk 0: block 2, offset 1
    assert torch.equal(chunks[0, 1, 0, 5], k) and torch.equal(chunks[0, 1, 1, 5], v)
    k, v = k_and_v(layout, raw[2], 5, 3)  # token 3 of chunk 1: block 5, offset 3
    assert torch.equal(chunks[1, 2, 0, 3], k) and torch.equal(chunks[1, 2, 1, 3], v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the engine's, per host
@pytest.mark.parametrize("layout", ["cpu", "flash_attn", "flashinfer"])
def test_scatter_round_trips_and_leaves_skipped_blocks_alone(
    layout: str, dtype: torch.dtype
) -> None:
    raw = make(layout, dtype)
    block_ids = [7, 2, 5, 0]
    chunks = blocks_to_chunks([block_view(t, HEADS, DIM) for t in raw], block_ids, 8)
    target = [torch.zeros_like(t) for t in raw]
    views = [block_view(t, HEADS, DIM) for t in target]
    chunks_to_blocks(chunks, views, block_ids, skip_blocks=1)
    for src, dst in zip(raw, target, strict=True):
        s, d = block_view(src, HEADS, DIM), block_view(dst, HEADS, DIM)
        assert torch.equal(d[[2, 5, 0]], s[[2, 5, 0]])  # written through the view
        assert not d[7].any()  # the engine computed that block itself
        assert not d[[1, 3, 4, 6, 8]].any()  # nothing else touched


def test_unknown_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown paged KV layout"):
        block_view(torch.zeros(4, 3, 3), HEADS, DIM)


def test_scatter_of_a_chunk_used_in_part() -> None:
    raw = make("cpu")
    chunks = blocks_to_chunks([block_view(t, HEADS, DIM) for t in raw], [7, 2, 5, 0], 8)
    target = [torch.zeros_like(t) for t in raw]
    views = [block_view(t, HEADS, DIM) for t in target]
    chunks_to_blocks(chunks, views, [7, 2, 5], skip_blocks=0)  # last block not wanted
    for src, dst in zip(raw, target, strict=True):
        assert torch.equal(dst[[7, 2, 5]], src[[7, 2, 5]])
        assert not dst[0].any()


@pytest.mark.parametrize("layout", ["cpu", "flash_attn", "flashinfer"])
def test_gather_into_separate_buffers_follows_runs_of_blocks(layout: str) -> None:
    raw = make(layout)
    views = [block_view(t, HEADS, DIM) for t in raw]
    block_ids = [3, 4, 9, 1, 2, 6]  # runs 3-4 | 9 | 1-2 | 6, across chunk boundaries
    dests = [torch.zeros((LAYERS, 2, 8, HEADS, DIM), dtype=torch.bfloat16) for _ in range(3)]
    gather_chunks(views, block_ids, dests)
    expected = blocks_to_chunks(views, block_ids, 8)
    for c in range(3):
        for j in range(2):  # each block of the chunk, token by token, by the layout's own rule
            for li in range(LAYERS):
                k, v = k_and_v(layout, raw[li], block_ids[2 * c + j], 2)
                assert torch.equal(dests[c][li, 0, 4 * j + 2], k)
                assert torch.equal(dests[c][li, 1, 4 * j + 2], v)
        assert torch.equal(dests[c], expected[c])
    with pytest.raises(ValueError, match=r"3 chunks of \[2, 2, 2\] blocks got 5 blocks"):
        gather_chunks(views, block_ids[:5], dests)


def test_a_tail_shorter_than_a_chunk_is_gathered_and_scattered_last() -> None:
    raw = make("cpu")
    views = [block_view(t, HEADS, DIM) for t in raw]
    block_ids = [3, 4, 9]  # one chunk of two blocks, then a tail of one block
    dests = [torch.zeros((LAYERS, 2, n, HEADS, DIM), dtype=torch.bfloat16) for n in (8, 4)]
    gather_chunks(views, block_ids, dests)
    target = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(dests, [block_view(t, HEADS, DIM) for t in target], [5, 6, 7])
    for src, dst in zip(raw, target, strict=True):
        assert torch.equal(dst[[5, 6, 7]], src[block_ids])
        assert not dst[8].any()
    only_tail = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(dests[1:], [block_view(t, HEADS, DIM) for t in only_tail], [0])
    assert all(torch.equal(d[0], s[9]) for d, s in zip(only_tail, raw, strict=True))
