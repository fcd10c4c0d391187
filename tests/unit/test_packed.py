"""Chunks placed in an AMX-packed CPU cache through address tables (kvtier.integrations.vllm
.packed): the same blocks as torch's per-view copies, checked as they are copied, int4r
and int8 decoded straight into them."""

from __future__ import annotations

import pytest
import torch

from kvtier import codec, deferred, native, quant, quant4
from kvtier.chunk import KVChunk
from kvtier.codec import Compression
from kvtier.integrations.vllm import packed
from kvtier.integrations.vllm.paged import (
    PagedLayer,
    block_view,
    blocks_to_chunks,
    chunks_to_blocks,
)
from kvtier.keys import ChunkKey

pytestmark = pytest.mark.skipif(native.library() is None, reason="kvtier's C kernels not built")

LAYERS, HEADS, BLOCK, DIM, BLOCKS = 3, 2, 32, 64, 10
KEY = ChunkKey(b"k" * 16)


def cache() -> list[torch.Tensor]:
    return [torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]


def layers_of(raw: list[torch.Tensor]) -> list[PagedLayer]:
    return [block_view(t, HEADS, DIM, packed=True) for t in raw]


def chunks(n: int = 2) -> torch.Tensor:
    """``n`` chunks of 2 blocks each, random bf16 KV."""
    torch.manual_seed(3)
    source = [torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM).bfloat16() for _ in range(LAYERS)]
    return blocks_to_chunks(layers_of(source), list(range(2 * n)), 2 * BLOCK)


def blob(chunk: torch.Tensor, compression: Compression = Compression.NONE, runs: int = 0) -> bytes:
    kv = KVChunk.from_array(chunk.view(torch.int16).numpy().view("uint16"), "bfloat16")
    kv = KVChunk(kv.dtype, kv.shape, kv.data, runs)  # a packed chunk's K/V runs: a block's
    return bytes(codec.encode(KEY, kv, "ab" * 8, compression))


def test_the_tables_place_what_torch_copies_place() -> None:
    """Block ids out of order and in runs, the first block skipped (already computed)."""
    kv, ids = chunks(), [7, 8, 2, 5]
    assert packed.takes(layers_of(cache()))
    by_table, by_views = cache(), cache()
    assert packed.place(list(kv), layers_of(by_table), ids, 1, []) == 2
    for c, chunk in enumerate(kv):
        for li in range(LAYERS):
            rows = chunk[li].reshape(2, -1)
            for b in range(2):
                if 2 * c + b >= 1:
                    by_views[li][ids[2 * c + b]].view(-1).copy_(rows[b])
    assert all(torch.equal(a, b) for a, b in zip(by_table, by_views, strict=True))
    assert not any(t[7].any() for t in by_table)  # the skipped block is left alone


def test_a_payload_is_hashed_as_it_is_copied_and_a_corrupt_one_stops_there() -> None:
    """Each chunk views its stored payload, as a DRAM hit's does."""
    blobs = [bytearray(blob(chunk)) for chunk in chunks()]
    blobs[1][-1] ^= 1  # the second chunk's bytes no longer hash to its checksum
    views, checks = [], []
    for b in blobs:
        opened = deferred.open_raw(b, KEY)
        assert opened is not None
        data = torch.frombuffer(opened[0].data, dtype=torch.bfloat16)
        views.append(data.view(LAYERS, 2, 2 * BLOCK, HEADS, DIM))
        checks.append(opened[1])
    assert packed.place(views, layers_of(cache()), [0, 1, 2, 3], 0, checks) == 1
    assert packed.place(views[:1], layers_of(cache()), [0, 1], 0, checks) == 1
    blobs[1][-1] ^= 1
    target = cache()
    assert packed.place(views, layers_of(target), [0, 1, 2, 3], 0, checks) == 2
    assert all(t[3].any() for t in target)


KERNELS = {
    Compression.INT4R: quant4.native_int4r(),
    Compression.K8V4: quant4.native_int4r(),
    Compression.INT8: quant.native_int8(),
}


@pytest.mark.parametrize("compression", list(KERNELS))
@pytest.mark.parametrize("ids", [[6, 3], [4, 5]])  # [4, 5]: a layer's one copy, no scratch
@pytest.mark.parametrize("runs", [0, BLOCK])
def test_a_stored_form_is_decoded_straight_into_its_blocks(
    compression: Compression, ids: list[int], runs: int
) -> None:
    if not KERNELS[compression]:
        pytest.skip(f"the {compression.name.lower()} kernel does not run here")
    kv = chunks(1)
    stored = blob(kv[0], compression, runs)
    form = deferred.open_stored(stored, KEY)
    assert form is not None and form.name == compression.name.lower() and form.runs == runs
    decoded = torch.frombuffer(bytearray(codec.decode(stored).chunk.data), dtype=torch.bfloat16)
    direct, copied = cache(), cache()
    placeholder = torch.empty_like(kv[0])  # the raw-sized buffer a load holds, no KV in it
    assert packed.place([placeholder], layers_of(direct), ids, 0, [form]) == 1
    assert packed.place([decoded.view(kv[0].shape)], layers_of(copied), ids, 0, []) == 1
    assert all(torch.equal(a, b) for a, b in zip(direct, copied, strict=True))
    assert all(t[ids].any() and not t[[0, 9]].any() for t in direct)
    other = torch.empty(LAYERS, 2, 2 * BLOCK, 1, DIM, dtype=torch.bfloat16)  # another shape
    assert packed.place([other], layers_of(cache()), [6, 3], 0, [form]) == 0


def test_chunks_the_tables_cannot_move_as_bytes_go_to_torchs_copies() -> None:
    """Another dtype (converted), a strided view: placed as torch places them, never past the
    cache (found in review: an fp32 chunk was moved as bytes into the blocks after the cache's)."""
    kv = chunks(1)
    layers = layers_of(cache())
    assert packed.fits([kv[0]], layers)
    wide = kv[0].float()
    strided = torch.cat([kv[0], kv[0]], dim=3)[:, :, :, ::2]  # heads 0 and 0 again, strided
    assert not packed.fits([wide], layers) and not packed.fits([strided], layers)
    for chunk in (wide, strided):
        target = torch.zeros(2 * BLOCKS, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16)
        inside = [target[:BLOCKS] for _ in range(LAYERS)]
        chunks_to_blocks([chunk], layers_of(inside), [8, 9])
        assert not target[BLOCKS:].any()  # nothing past the cache
        assert target[8:10].any()
