"""kvtier's C int8 kernel (kvtier/native): built on this host, the same bytes as torch's
encode, and torch where it cannot be built or does not agree."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels import sample_kv
from kvtier import native, quant


def test_the_kernel_builds_here_and_writes_torchs_bytes(fresh: None, tmp_path: Path) -> None:
    assert quant.native_int8()  # make test installs a C compiler
    built = list((tmp_path / "cache" / "kvtier" / "native").glob("int8-*.so"))
    assert len(built) == 1
    for dtype in (torch.bfloat16, torch.float32):
        for shape in [(30, 2, 256, 3, 64), (2, 2, 17, 4, 80), (1, 2, 5, 1, 128)]:
            kv = sample_kv(shape, dtype, seed=len(shape) + shape[2])
            fast = quant.encode("int8", kv)
            slow = quant.encode("int8", kv, native=False)
            assert torch.equal(fast, slow), (dtype, shape)
            back = quant.decode("int8", fast, shape, dtype)
            assert torch.equal(back, quant.decode("int8", fast, shape, dtype, native=False))
            # Decoded in place: the stored form read into the front of the raw buffer.
            buf = torch.zeros(kv.numel() * kv.element_size(), dtype=torch.uint8)
            buf[: fast.numel()] = fast
            quant.decode("int8", buf[: fast.numel()], shape, dtype, buf.view(dtype).view(shape))
            assert torch.equal(buf.view(dtype).view(shape), back)
            err = (back.float() - kv.float()).abs().amax(dim=-1)
            assert bool((err <= kv.float().abs().amax(dim=-1) / 127).all())  # within a step
    # A view that is not contiguous (a packed cache's slice) encodes the same as its copy.
    kv = sample_kv((4, 2, 32, 3, 64), torch.bfloat16, seed=7)[:, :, ::2]
    assert torch.equal(quant.encode("int8", kv), quant.encode("int8", kv.contiguous()))
    # fp16 has no kernel: torch encodes it.
    half = sample_kv((2, 2, 8, 3, 64), torch.float16, seed=3)
    assert not native.int8_encode(half, torch.empty(half.numel(), dtype=torch.int8), torch.empty(0))
    assert torch.equal(quant.encode("int8", half), quant.encode("int8", half, native=False))


def test_without_a_compiler_torch_encodes(
    fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, "kvtier"):
        assert native.library() is None
        assert not quant.native_int8()
    assert "native kernels unavailable" in caplog.text
    kv = sample_kv((2, 2, 16, 3, 64), torch.bfloat16, seed=1)
    levels = torch.empty(kv.numel(), dtype=torch.int8)
    assert not native.int8_encode(kv, levels, torch.empty(kv.numel() // 64, dtype=torch.bfloat16))
    assert quant.encode("int8", kv).numel() == quant.stored_bytes("int8", tuple(kv.shape))


def test_a_kernel_that_disagrees_with_torch_is_never_used(
    fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    built = native.int8_encode

    def off_by_one(x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor) -> bool:
        wrote = built(x, levels, scales)
        levels[0] += 1  # a miscompiled kernel, say
        return wrote

    monkeypatch.setattr(native, "int8_encode", off_by_one)
    with caplog.at_level(logging.WARNING, "kvtier"):
        assert not quant.native_int8()
    assert "disagree with torch" in caplog.text
    kv = sample_kv((2, 2, 16, 3, 64), torch.bfloat16, seed=2)
    assert torch.equal(quant.encode("int8", kv), quant.encode("int8", kv, native=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_int8_table_decoder_writes_torchs_rows_and_refuses_parts_of_rows(
    dtype: torch.dtype,
) -> None:
    import numpy as np

    assert quant.native_int8()
    shape = (2, 2, 8, 3, 64)
    kv = sample_kv(shape, dtype, seed=4)
    stored = quant.encode("int8", kv)
    want = quant.decode("int8", stored, shape, dtype, native=False)
    out = torch.zeros_like(want)
    row, rows = 64 * want.element_size(), want.numel() // 64
    base = out.data_ptr()

    def table(dst: list[int], src: list[int], sizes: list[int]) -> tuple[Any, Any, Any]:
        return np.array(dst), np.array(src), np.array(sizes)

    out_of_order = table([base + 5 * row, base], [5 * row, 0], [(rows - 5) * row, 5 * row])
    assert native.int8_decode_table(stored, 64, dtype, rows, out_of_order)
    assert torch.equal(out, want)
    for part in table([base], [0], [row // 2]), table([base], [row], [rows * row]):
        assert not native.int8_decode_table(stored, 64, dtype, rows, part)  # half a row; past


def test_a_table_decoder_that_disagrees_with_torch_is_never_used(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = native.int8_decode_table

    def shifted(stored: torch.Tensor, *args: Any) -> bool:
        return built(torch.roll(stored, 1), *args)

    monkeypatch.setattr(native, "int8_decode_table", shifted)
    assert not quant.native_int8()


def test_an_int8_disk_hit_decodes_in_the_buffer_it_was_read_into(tmp_path: Path) -> None:
    """A bf16 chunk stored int8 on disk is read into the front of its raw-sized buffer,
    verified and decoded there: what comes back is exactly torch's decode of the stored bytes,
    and a flipped bit in the file is a miss, never wrong KV."""
    from kvtier import Namespace, TieredStore
    from kvtier.chunk import KVChunk
    from kvtier.codec import Compression
    from kvtier.tiers import DiskTier, MemoryTier

    assert quant.native_int8()
    ns = Namespace("test/int8-in-place", kv_dtype="bfloat16")
    shape = (2, 2, 32, 3, 64)
    kvs = [sample_kv(shape, torch.bfloat16, seed=s) for s in range(3)]
    chunks = [KVChunk("bfloat16", shape, kv.view(torch.uint8).numpy().tobytes()) for kv in kvs]
    tokens = list(range(1000, 1000 + 3 * 32))
    comps = [Compression.NONE, Compression.INT8]

    def store() -> TieredStore:
        disk = DiskTier(tmp_path / "d", 1 << 30, fsync=False)
        return TieredStore([MemoryTier(1 << 24), disk], 32, compression=comps)

    with store() as s:
        s.put(tokens, ns, chunks)
        s.flush()
    raw = [len(c.data) for c in chunks]  # as the vLLM loader reads: into raw-sized buffers
    with store() as s:
        got = s.get(tokens, ns, payload_bytes=raw)
        assert got.tiers == ["disk"] * 3
        for c, kv in zip(got.chunks, kvs, strict=True):
            stored = quant.encode("int8", kv)
            want = quant.decode("int8", stored, shape, torch.bfloat16, native=False)
            assert bytes(c.data) == want.view(torch.uint8).numpy().tobytes()
    files = sorted((tmp_path / "d").rglob("*.kvc"))
    assert len(files) == 3
    damaged = bytearray(files[1].read_bytes())
    damaged[-5] ^= 0x10  # a scale's bit
    files[1].write_bytes(bytes(damaged))
    with store() as s:
        got = s.get(tokens, ns, payload_bytes=raw)
        assert len(got.tiers) < 3 and s.stats().tiers["disk"].corruptions == 1


@pytest.mark.parametrize("layout", ["cpu", "cpu-packed", "flash_attn"])
def test_a_load_scatters_in_one_native_call_the_bytes_torch_would(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvtier.integrations.vllm import packed as packed_cache
    from kvtier.integrations.vllm.paged import block_view, blocks_to_chunks, chunks_to_blocks

    torch.manual_seed(0)
    shape = (2, 12, 4, 3, 8) if layout == "flash_attn" else (12, 3, 4, 16)
    packed = layout == "cpu-packed"
    raw = [torch.randn(shape, dtype=torch.bfloat16) for _ in range(3)]
    chunks = blocks_to_chunks([block_view(t, 3, 8, packed) for t in raw], [7, 2, 5, 0], 8)
    calls: list[tuple[str, int]] = []
    copy_many, copy_table, takes = native.copy_many, native.copy_table, packed_cache.takes

    def counted(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        done = copy_many(pairs)
        calls.append(("pairs", len(pairs) if done else 0))
        return done

    def counted_table(table: tuple[Any, Any, Any]) -> bool:
        calls.append(("table", len(table[0])))
        return copy_table(table)

    results = []
    for kernel in (True, False):  # the kernel, then torch's copies
        monkeypatch.setattr(native, "copy_many", counted if kernel else lambda pairs: False)
        monkeypatch.setattr(native, "copy_table", counted_table)
        monkeypatch.setattr(packed_cache, "takes", takes if kernel else lambda layers: False)
        target = [torch.zeros_like(t) for t in raw]
        chunks_to_blocks(chunks, [block_view(t, 3, 8, packed) for t in target], [1, 3, 4, 6])
        results.append(target)
        if kernel:
            kernel_calls, calls = calls, []
    # vLLM's unpacked CPU layout (K transposed per head) is not one run of memory per copy:
    # torch copies it. Others: one call for every layer's runs of blocks; a packed cache's
    # from its tables, one per chunk (3 layers, each chunk's 2 blocks not consecutive).
    expected = {
        "cpu": [("pairs", 0)],
        "flash_attn": [("pairs", 4 * 3 * 2)],  # per chunk, run, layer, K/V
        "cpu-packed": [("table", 6), ("table", 6)],
    }[layout]
    assert kernel_calls == expected and calls in ([], [("pairs", 0)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b) and a.count_nonzero() > 0


def test_copies_torch_must_convert_are_left_to_torch() -> None:
    a, b = torch.zeros(64, dtype=torch.bfloat16), torch.ones(32, dtype=torch.float32)
    assert not native.copy_many([(a, b)])  # the same bytes, not the same values
    assert not native.copy_many([(a[::2], torch.ones(32, dtype=torch.bfloat16))])  # strided
    assert a.count_nonzero() == 0
    assert native.copy_many([(a, torch.ones(64, dtype=torch.bfloat16))]) and bool((a == 1).all())


def test_a_copy_that_hashes_what_it_moves_gives_the_chunks_checksum() -> None:
    """copy_hash: the payload scattered in pieces (any order) and its xxh3 with the header's
    prefix in one read; pieces that do not cover the payload once are refused, untouched."""
    import xxhash

    from kvtier.native import xxh3

    assert xxh3.available()  # make test installs the xxhash package that exports them
    g = torch.Generator().manual_seed(3)
    payload = torch.randint(0, 256, (300_000,), dtype=torch.uint8, generator=g)
    prefix = bytes(range(88))
    cuts = [0, 70_001, 70_002, 150_000, 300_000]
    pieces = [payload[a:b] for a, b in itertools.pairwise(cuts)]
    dests = [torch.zeros_like(p) for p in pieces]
    pairs = list(zip(dests, pieces, strict=True))[::-1]  # order of the copies does not matter
    want = xxhash.xxh3_64(prefix + payload.numpy().tobytes()).intdigest()
    assert native.copy_hash(pairs, prefix, payload.numpy()) == want
    assert all(torch.equal(d, p) for d, p in pairs)
    assert xxh3.checksum(prefix, payload.numpy()) == want == xxh3.checksum(prefix, bytes(payload))
    for bad in (pairs[1:], [*pairs, pairs[0]]):  # a gap; a piece twice
        fresh = [(torch.zeros_like(d), s) for d, s in bad]
        assert native.copy_hash(fresh, prefix, payload.numpy()) is None
        assert all(d.count_nonzero() == 0 for d, _ in fresh)
