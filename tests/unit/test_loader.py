"""The connector's Loader: chunks from kvtier's store into vLLM's paged blocks, each piece read,
verified and placed by a reader thread; the leading run loaded, the rest left for vLLM; and
saves turned off where no tier can hold a chunk."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kvtier import codec, quant
from kvtier.chunk import KVChunk
from kvtier.codec import Compression
from kvtier.integrations.vllm.loader import READS, Loader
from kvtier.integrations.vllm.messages import LoadSpec
from kvtier.integrations.vllm.paged import block_view, chunks_to_blocks, gather_chunks
from kvtier.integrations.vllm.worker import can_hold
from kvtier.keys import Namespace
from kvtier.store import TieredStore
from kvtier.tiers.disk import READERS, DiskTier
from kvtier.tiers.memory import MemoryTier

LAYERS, HEADS, DIM, BLOCK, CHUNK = 2, 2, 8, 4, 8  # two blocks a chunk
NS = Namespace("m", "", "float32", "test-layout")


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("missing", [None, 1, READS + 1])
def test_a_load_places_the_leading_run_and_leaves_the_rest_to_vllm(
    packed: bool, missing: int | None
) -> None:
    chunks = 2 * READS + 1  # more than the reader threads: each reads several
    tokens = list(range(100, 100 + chunks * CHUNK))
    torch.manual_seed(1)
    source = [torch.randn(64, HEADS, BLOCK, 2 * DIM) for _ in range(LAYERS)]
    src_blocks = list(range(1, 2 * chunks + 1))
    cache = [torch.zeros_like(t) for t in source]
    layers = [block_view(t, HEADS, DIM, packed) for t in cache]
    store = TieredStore([MemoryTier(1 << 26)], CHUNK)
    loader = Loader(store, layers, CHUNK, lambda _: NS, lambda keys: None)
    shape = loader.chunk_shape()
    kv = [torch.empty(shape) for _ in range(chunks)]
    gather_chunks([block_view(t, HEADS, DIM, packed) for t in source], src_blocks, kv)
    held = [c for c in range(chunks) if c != missing]
    for c in held:  # each chunk put alone: a missing one leaves a hole in the run
        store.put(tokens, NS, [KVChunk.from_array(kv[c].numpy())], start_chunk=c)
    blocks = list(range(40, 40 + 2 * chunks))  # where vLLM wants the prompt
    loader.load(LoadSpec("r", tokens, None, blocks, 0, len(tokens)))
    run = chunks if missing is None else missing
    failed = loader.failed_blocks()
    assert failed == set(blocks[2 * run :])
    for src, dst in zip(source, cache, strict=True):
        assert torch.equal(dst[blocks[: 2 * run]], src[src_blocks[: 2 * run]])
    (report,) = loader.reports()
    assert report["loaded"] == {"memory": run * CHUNK}
    assert report["failed_tokens"] == (chunks - run) * CHUNK
    loader.close()
    store.close()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("damaged", [None, 0, READS + 1])
def test_a_dram_chunk_whose_payload_does_not_hash_to_its_checksum_is_recomputed(
    packed: bool, damaged: int | None
) -> None:
    """DRAM chunks are hashed as they are copied into the blocks (packed: in the C copy; the
    unpacked layout hashes first): a damaged one ends the run, vLLM recomputes from it, and it
    is removed as corrupt. Undamaged, the same load places every chunk."""
    chunks = 2 * READS + 1
    tokens = list(range(500, 500 + chunks * CHUNK))
    torch.manual_seed(2)
    source = [torch.randn(64, HEADS, BLOCK, 2 * DIM) for _ in range(LAYERS)]
    src_blocks = list(range(1, 2 * chunks + 1))
    cache = [torch.zeros_like(t) for t in source]
    store = TieredStore([MemoryTier(1 << 26)], CHUNK)
    layers = [block_view(t, HEADS, DIM, packed) for t in cache]
    loader = Loader(store, layers, CHUNK, lambda _: NS, lambda keys: None)
    kv = [torch.empty(loader.chunk_shape()) for _ in range(chunks)]
    gather_chunks([block_view(t, HEADS, DIM, packed) for t in source], src_blocks, kv)
    store.put(tokens, NS, [KVChunk.from_array(c.numpy()) for c in kv])
    if damaged is not None:  # one bit of its KV flipped where the DRAM tier holds it
        memory = store.tiers[0]
        key = store.keys(tokens, NS)[damaged]
        blob = bytearray(memory.get_many([key])[0])  # type: ignore[arg-type]
        blob[-7] ^= 0x10
        memory.put_many([(key, bytes(blob))])
    blocks = list(range(40, 40 + 2 * chunks))
    loader.load(LoadSpec("r", tokens, None, blocks, 0, len(tokens)))
    run = chunks if damaged is None else damaged
    assert loader.failed_blocks() == set(blocks[2 * run :])
    for src, dst in zip(source, cache, strict=True):
        assert torch.equal(dst[blocks[: 2 * run]], src[src_blocks[: 2 * run]])
    assert loader.reports()[0]["loaded"] == ({"memory": run * CHUNK} if run else {})
    assert store.stats().tiers["memory"].corruptions == (damaged is not None)
    assert store.lookup(tokens, NS).hit_chunks == run  # the damaged copy is gone
    loader.close()
    store.close()


def test_saves_are_off_only_where_no_tier_can_hold_a_chunk(tmp_path: Path) -> None:
    chunk = 6_000_000
    with TieredStore([MemoryTier(1 << 20)], CHUNK) as store:  # kvtier bench chat's baseline
        assert not can_hold(store, chunk)
        assert can_hold(store, 100_000)
    with TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 30)], CHUNK) as store:
        assert can_hold(store, chunk)
    with TieredStore([MemoryTier(1 << 30)], CHUNK) as store:
        assert can_hold(store, chunk)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dim", [64, 8])  # 8: a head the int4r kernel does not take
@pytest.mark.parametrize("damaged", [None, 1])
@pytest.mark.parametrize("name", ["int4r", "k8v4", "int8"])
def test_quantized_chunks_are_decoded_into_the_blocks_and_kept_in_dram_as_stored(
    tmp_path: Path, packed: bool, dim: int, damaged: int | None, name: str
) -> None:
    """A disk tier storing int4r or int8: a load decodes each chunk straight into vLLM's
    blocks (int4r heads of 64: layer by layer through a scratch; int8: row by row; other
    int4r heads: into the chunk's buffer, then copied),
    the KV placed is what decoding the chunk gives, and DRAM then holds the chunks in their
    stored form (raw where the kernel does not take the head), from which a second load
    places the same. A chunk damaged on disk ends the
    run there: vLLM recomputes from it."""
    chunks = READS + 2
    tokens = list(range(900, 900 + chunks * CHUNK))
    torch.manual_seed(3)
    source = [torch.randn(64, HEADS, BLOCK, 2 * dim) for _ in range(LAYERS)]
    src_blocks = list(range(1, 2 * chunks + 1))
    comps = [Compression.NONE, Compression.named(name)]
    in_place = name == "int8" or dim == 64

    def store() -> TieredStore:
        disk = DiskTier(tmp_path / "d", 1 << 30, fsync=False)
        return TieredStore([MemoryTier(1 << 26), disk], CHUNK, compression=comps)

    def loader_for(s: TieredStore, cache: list[torch.Tensor]) -> Loader:
        layers = [block_view(t, HEADS, dim, packed) for t in cache]
        return Loader(s, layers, CHUNK, lambda _: NS, lambda keys: None)

    with store() as s:
        shape = loader_for(s, source).chunk_shape()
        kv = [torch.empty(shape) for _ in range(chunks)]
        gather_chunks([block_view(t, HEADS, dim, packed) for t in source], src_blocks, kv)
        s.put(tokens, NS, [KVChunk.from_array(c.numpy()) for c in kv])
    if damaged is not None:
        files = {f.stem: f for f in (tmp_path / "d").rglob("*.kvc")}
        with store() as s:
            path = files[s.keys(tokens, NS)[damaged].hex()]
        data = bytearray(path.read_bytes())
        data[200] ^= 0x04
        path.write_bytes(bytes(data))
    # what each chunk decodes to, placed by the plain copy
    expected = [torch.zeros_like(t) for t in source]
    decoded = [quant.decode(name, quant.encode(name, c), shape, c.dtype) for c in kv]
    ref_layers = [block_view(t, HEADS, dim, packed) for t in expected]
    blocks = list(range(40, 40 + 2 * chunks))
    chunks_to_blocks(decoded, ref_layers, blocks)
    run = chunks if damaged is None else damaged
    with store() as s:
        for tier in ("disk", "memory"):
            cache = [torch.zeros_like(t) for t in source]
            loader = loader_for(s, cache)
            loader.load(LoadSpec("r", tokens, None, blocks, 0, len(tokens)))
            assert loader.failed_blocks() == set(blocks[2 * run :])
            assert loader.reports()[0]["loaded"] == {tier: run * CHUNK}
            for got, want in zip(cache, expected, strict=True):
                assert torch.equal(got[blocks[: 2 * run]], want[blocks[: 2 * run]]), tier
            loader.close()
            held = s.tiers[0].get_many(s.keys(tokens, NS)[:run])
            forms = {codec.read_header(b).compression for b in held}  # type: ignore[arg-type]
            # kept as stored; an int4r head the kernel does not take: decoded, held raw
            assert forms == {comps[1] if in_place else Compression.NONE}
            if in_place:  # held at the stored size: the read's raw-sized buffer cut to it
                sizes = {len(b) for b in held}  # type: ignore[arg-type]
                disk_sizes = {len(b) for b in s.tiers[1].get_many(s.keys(tokens, NS)[:run])}  # type: ignore[arg-type]
                small = {"int4r": 0.31, "k8v4": 0.41, "int8": 0.53}[name]
                assert sizes == disk_sizes and max(sizes) < small * loader.chunk_bytes()
        assert s.stats().tiers["disk"].corruptions == (damaged is not None)


def test_a_warmed_disk_tier_has_its_reader_threads_and_buffers_before_any_read(
    tmp_path: Path,
) -> None:
    """`kvtier serve`'s worker warms the store as the engine starts: each of a disk tier's
    reader threads then holds its touched O_DIRECT buffer, so that the first hit after a
    start does not fault them in. Before, no thread existed until the first read."""
    disk = DiskTier(tmp_path / "w", 1 << 30, fsync=False)
    with TieredStore([MemoryTier(1 << 20), disk], CHUNK) as store:
        assert disk._readers is None
        store.warm()
        assert disk._readers is not None
        names = [t.name for t in threading.enumerate() if t.name.startswith("kvtier-read")]
        assert len(names) == READERS, names
        touched = disk._readers.map(lambda _: disk.files._direct_buffer.buf is not None, [0] * 8)
        assert all(touched)
