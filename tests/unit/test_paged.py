"""Chunk layout <-> vLLM's paged KV blocks (CPU, FlashAttention and FlashInfer layouts); the CPU
layout checked against vLLM's own kernel that writes it."""

from __future__ import annotations

import pytest
import torch

from kvtier.integrations.vllm.paged import (
    PagedLayer,
    block_view,
    blocks_to_chunks,
    chunks_to_blocks,
    gather_chunks,
)

LAYERS, HEADS, BLOCK, DIM, NBLOCKS = 3, 2, 4, 5, 12
LAYOUTS = ["cpu", "flash_attn", "flashinfer"]


def make(layout: str, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shape = {
        "cpu": (NBLOCKS, HEADS, BLOCK, 2 * DIM),
        "flash_attn": (2, NBLOCKS, BLOCK, HEADS, DIM),
        "flashinfer": (NBLOCKS, 2, BLOCK, HEADS, DIM),
    }[layout]
    return [torch.randn(shape, dtype=dtype) for _ in range(LAYERS)]


def views(raw: list[torch.Tensor], packed: bool = False) -> list[PagedLayer]:
    return [block_view(t, HEADS, DIM, packed) for t in raw]


def k_and_v(layout: str, layer: torch.Tensor, block: int, offset: int) -> tuple[torch.Tensor, ...]:
    """K and V (heads, dim) of one token slot, read the way each backend lays them out."""
    if layout == "cpu":  # per head: K transposed (dim, block), then V (block, dim)
        per_head = layer[block].reshape(HEADS, 2 * BLOCK * DIM)
        k = per_head[:, : BLOCK * DIM].view(HEADS, DIM, BLOCK)[:, :, offset]
        return k, per_head[:, BLOCK * DIM :].view(HEADS, BLOCK, DIM)[:, offset]
    if layout == "flash_attn":
        return layer[0, block, offset], layer[1, block, offset]
    return layer[block, 0, offset], layer[block, 1, offset]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the engine's, per host
@pytest.mark.parametrize("head_dim", [64, 48])  # vLLM's "vec" and "vec16" CPU kernels
def test_the_cpu_layout_is_what_vllms_own_kernel_writes(dtype: torch.dtype, head_dim: int) -> None:
    ops = pytest.importorskip("vllm._custom_ops")
    heads, block, blocks, tokens = 2, 32, 4, 80
    cache = torch.zeros(blocks, heads, block, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * block, head_dim).chunk(2, dim=2)
    key = torch.randn(tokens, heads, head_dim).to(dtype)
    value = torch.randn(tokens, heads, head_dim).to(dtype)
    slots = torch.cat([torch.arange(32) + 96, torch.arange(48)])  # blocks 3, 0 and half of 1
    isa = "vec" if head_dim % 32 == 0 else "vec16"
    ops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0
    )
    layer = block_view(cache, heads, head_dim)
    chunk = torch.zeros(1, 2, 80, heads, head_dim, dtype=dtype)  # 2.5 blocks: a tail
    gather_chunks([layer], [3, 0, 1], [chunk])
    assert torch.equal(chunk[0, 0], key) and torch.equal(chunk[0, 1], value)
    back = torch.zeros_like(cache)
    chunks_to_blocks([chunk], [block_view(back, heads, head_dim)], [3, 0, 1])
    assert torch.equal(back, cache)  # block 1 in part: its other 16 slots stay 0 in both


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the engine's, per host
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_puts_k_then_v_of_each_token_in_chunk_layout(
    layout: str, dtype: torch.dtype
) -> None:
    raw = make(layout, dtype)
    chunks = blocks_to_chunks(views(raw), [7, 2, 5, 0], 8)  # two chunks of 8 tokens, 2 blocks each
    assert chunks.shape == (2, LAYERS, 2, 8, HEADS, DIM)
    k, v = k_and_v(layout, raw[1], 2, 1)  # token 5 of chunk 0: block 2, offset 1
    assert torch.equal(chunks[0, 1, 0, 5], k) and torch.equal(chunks[0, 1, 1, 5], v)
    k, v = k_and_v(layout, raw[2], 5, 3)  # token 3 of chunk 1: block 5, offset 3
    assert torch.equal(chunks[1, 2, 0, 3], k) and torch.equal(chunks[1, 2, 1, 3], v)


def blocks_of(raw: torch.Tensor, layout: str, ids: list[int]) -> torch.Tensor:
    """The memory of blocks ``ids`` of one layer, whatever the layout."""
    return raw[:, ids] if layout == "flash_attn" else raw[ids]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the engine's, per host
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_round_trips_and_leaves_skipped_blocks_alone(
    layout: str, dtype: torch.dtype
) -> None:
    raw = make(layout, dtype)
    block_ids = [7, 2, 5, 0]
    chunks = blocks_to_chunks(views(raw), block_ids, 8)
    target = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(chunks, views(target), block_ids, skip_blocks=1)
    for src, dst in zip(raw, target, strict=True):
        assert torch.equal(blocks_of(dst, layout, [2, 5, 0]), blocks_of(src, layout, [2, 5, 0]))
        assert not blocks_of(dst, layout, [7]).any()  # the engine computed that block itself
        assert not blocks_of(dst, layout, [1, 3, 4, 6, 8]).any()  # nothing else touched


def test_unknown_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown paged KV layout"):
        block_view(torch.zeros(4, 3, 3), HEADS, DIM)


def test_scatter_of_a_chunk_used_in_part() -> None:
    raw = make("cpu")
    chunks = blocks_to_chunks(views(raw), [7, 2, 5, 0], 8)
    target = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(chunks, views(target), [7, 2, 5], skip_blocks=0)  # last block not wanted
    for src, dst in zip(raw, target, strict=True):
        assert torch.equal(dst[[7, 2, 5]], src[[7, 2, 5]])
        assert not dst[0].any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_into_separate_buffers_follows_runs_of_blocks(layout: str) -> None:
    raw = make(layout)
    block_ids = [3, 4, 9, 1, 2, 6]  # runs 3-4 | 9 | 1-2 | 6, across chunk boundaries
    dests = [torch.zeros((LAYERS, 2, 8, HEADS, DIM), dtype=torch.bfloat16) for _ in range(3)]
    gather_chunks(views(raw), block_ids, dests)
    expected = blocks_to_chunks(views(raw), block_ids, 8)
    for c in range(3):
        for j in range(2):  # each block of the chunk, token by token, by the layout's own rule
            for li in range(LAYERS):
                k, v = k_and_v(layout, raw[li], block_ids[2 * c + j], 2)
                assert torch.equal(dests[c][li, 0, 4 * j + 2], k)
                assert torch.equal(dests[c][li, 1, 4 * j + 2], v)
        assert torch.equal(dests[c], expected[c])
    with pytest.raises(ValueError, match=r"3 chunks of \[2, 2, 2\] blocks got 5 blocks"):
        gather_chunks(views(raw), block_ids[:5], dests)


def test_a_tail_shorter_than_a_chunk_is_gathered_and_scattered_last() -> None:
    raw = make("cpu")
    block_ids = [3, 4, 9]  # one chunk of two blocks, then a tail of one block
    dests = [torch.zeros((LAYERS, 2, n, HEADS, DIM), dtype=torch.bfloat16) for n in (8, 4)]
    gather_chunks(views(raw), block_ids, dests)
    target = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(dests, views(target), [5, 6, 7])
    for src, dst in zip(raw, target, strict=True):
        assert torch.equal(dst[[5, 6, 7]], src[block_ids])
        assert not dst[8].any()
    only_tail = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(dests[1:], views(only_tail), [0])
    assert all(torch.equal(d[0], s[9]) for d, s in zip(only_tail, raw, strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_tail_ending_inside_a_block_moves_its_tokens_only(layout: str) -> None:
    raw = make(layout)
    block_ids = [3, 4, 9, 1]  # a chunk of two blocks, then a tail of 6 tokens: 1.5 blocks
    dests = [torch.zeros((LAYERS, 2, n, HEADS, DIM), dtype=torch.bfloat16) for n in (8, 6)]
    gather_chunks(views(raw), block_ids, dests)
    for li in range(LAYERS):  # the tail's token 5 is slot 1 of block 1
        k, v = k_and_v(layout, raw[li], 1, 1)
        assert torch.equal(dests[1][li, 0, 5], k) and torch.equal(dests[1][li, 1, 5], v)
    with pytest.raises(ValueError, match=r"2 chunks of \[2, 2\] blocks got 3 blocks"):
        gather_chunks(views(raw), block_ids[:3], dests)
    target = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(dests, views(target), [5, 6, 7, 8], skip_blocks=1)
    for src, dst in zip(views(raw), views(target), strict=True):
        for s, d in zip(src.kv, dst.kv, strict=True):
            assert not d[5].any()  # skipped: the engine's own
            assert torch.equal(d[[6, 7]], s[[4, 9]])
            assert torch.equal(d[8, :2], s[1, :2])  # the tail's two tokens in block 8
            assert not d[8, 2:].any()  # the rest of that block is the engine's to compute
            assert not d[[0, 1, 2, 3, 4, 9, 10, 11]].any()


def test_a_packed_cache_moves_whole_blocks_as_they_are() -> None:
    raw = make("cpu")
    chunks = blocks_to_chunks(views(raw, packed=True), [7, 2, 5, 0], 8)
    target = [torch.zeros_like(t) for t in raw]
    chunks_to_blocks(chunks, views(target, packed=True), [1, 3, 4, 6])
    for src, dst in zip(raw, target, strict=True):
        assert torch.equal(dst[[1, 3, 4, 6]], src[[7, 2, 5, 0]])
    # Each layer of a chunk holds its blocks' bytes one after the other (one copy per run).
    for li, src in enumerate(raw):
        first_chunk = torch.cat([src[7].flatten(), src[2].flatten()])
        assert torch.equal(chunks[0, li].reshape(-1), first_chunk)
    # Its chunks are not per token: the per-token view of the same blocks differs.
    assert not torch.equal(chunks, blocks_to_chunks(views(raw), [7, 2, 5, 0], 8))


def _amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@pytest.mark.skipif(not _amx(), reason="vLLM's AMX kernel runs only on CPUs with AMX tiles")
def test_a_packed_tail_is_its_last_block_whole_and_the_engine_writes_on_after_it() -> None:
    """A packed cache's tail ends inside a block (48 of its 128 slots): kvtier stores and loads
    that block whole, the slots after the tail holding whatever the first prompt had there;
    vLLM's AMX kernel then writes the new prompt's tokens from slot 48 on. The blocks are then
    exactly what the kernel writes for the new prompt straight into fresh blocks: a token's
    slot is its own in the packed layout, so the slots past a tail are overwritten before any
    token can attend to them."""
    ops = pytest.importorskip("vllm._custom_ops")
    heads, block, dim, blocks, dtype = 3, 128, 64, 4, torch.bfloat16
    torch.manual_seed(1)

    def fresh() -> torch.Tensor:
        return torch.zeros(blocks, heads, block, 2 * dim, dtype=dtype)

    def write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: range) -> None:
        k_cache, v_cache = cache.view(blocks, heads, 2 * block, dim).chunk(2, dim=2)
        at = torch.tensor(list(slots), dtype=torch.int64)
        ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, at, "amx", 1.0, 1.0)

    first_k, first_v = torch.randn(228, heads, dim, dtype=dtype), torch.randn(228, heads, dim)
    source = fresh()
    write(source, first_k, first_v.to(dtype), range(228))  # blocks 0 and 1 (100 of its slots)
    tail = 128 + 48  # a tail granule of 16 inside block 1
    chunk = torch.zeros(1, 2, 2 * block, heads, dim, dtype=dtype)  # the tail's whole blocks
    gather_chunks([block_view(source, heads, dim, packed=True)], [0, 1], [chunk])
    loaded = fresh()
    chunks_to_blocks([chunk], [block_view(loaded, heads, dim, packed=True)], [2, 3])
    new_k, new_v = torch.randn(80, heads, dim, dtype=dtype), torch.randn(80, heads, dim)
    write(loaded, new_k, new_v.to(dtype), range(2 * block + tail, 4 * block))
    direct = fresh()
    keys = torch.cat([first_k[:tail], new_k])
    values = torch.cat([first_v[:tail], new_v]).to(dtype)
    write(direct, keys, values, range(2 * block, 4 * block))
    assert torch.equal(loaded[2:], direct[2:])
    assert not torch.equal(source[1], direct[3])  # the first prompt's slots were overwritten
