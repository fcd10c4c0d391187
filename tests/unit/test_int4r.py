"""int4r: KV rotated by a normalized Walsh-Hadamard transform before KIVI's 4-bit grouping;
k8v4: K as int8 stores it, V as int4r does. The rotation is orthonormal and its own inverse;
the C kernel writes torch's bytes for both (and is refused where it does not); an outlier
channel costs the other channels less than in int4."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from kernels import sample_kv
from kvtier import codec, inflate, levels4, native, quant, quant4
from kvtier.chunk import KVChunk
from kvtier.codec import Compression
from kvtier.errors import CorruptChunk
from kvtier.keys import ChunkKey


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def test_the_rotation_is_the_normalized_hadamard_matrix_and_its_own_inverse() -> None:
    x = torch.randn(5, 64, dtype=torch.float64).float()
    assert torch.allclose(levels4.rotate(x), x @ _hadamard(64), atol=1e-5)
    assert torch.allclose(levels4.rotate(levels4.rotate(x)), x, atol=1e-5)
    # A head of 96 rotates in blocks of 32, the largest power of two dividing it.
    y = torch.randn(3, 96)
    blocks = torch.cat([y[:, i : i + 32] @ _hadamard(32) for i in (0, 32, 64)], dim=1)
    assert levels4.rotation_of(96) == 32 and levels4.rotation_of(128) == 128
    assert torch.allclose(levels4.rotate(y), blocks, atol=1e-5)


@pytest.mark.parametrize(
    "shape", [(30, 2, 256, 3, 64), (2, 2, 17, 4, 128), (1, 2, 5, 2, 64), (2, 2, 250, 1, 256)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", quant4.ROTATED)
def test_the_kernel_writes_torchs_bytes_and_decodes_to_its_values(
    shape: tuple[int, ...], dtype: torch.dtype, name: str
) -> None:
    assert quant4.native_int4r()  # make test installs a C compiler
    kv = sample_kv(shape, dtype, seed=shape[2])
    fast = quant.encode(name, kv)
    assert torch.equal(fast, quant.encode(name, kv, native=False))
    assert fast.numel() == quant.stored_bytes(name, shape)
    back = quant.decode(name, fast, shape, dtype)
    assert torch.equal(back, quant.decode(name, fast, shape, dtype, native=False))
    rel = _norms(back - kv) / _norms(kv)  # K's and V's
    assert (rel < 0.1).all(), rel
    if name == "k8v4":  # K as int8 stores it: 8 bits, its error a fraction of V's
        k_shape = (shape[0], 1, *shape[2:])
        k_int8 = quant.decode("int8", quant.encode("int8", kv[:, :1]), k_shape, dtype)
        assert torch.equal(back[:, :1], k_int8)
        assert rel[0] < rel[1] / 2, rel


def _norms(kv: torch.Tensor) -> torch.Tensor:
    """K's and V's norms."""
    return kv.float().transpose(0, 1).reshape(2, -1).norm(dim=1)


def test_k8v4_stores_k_at_eight_bits_and_v_at_four() -> None:
    shape = (30, 2, 256, 3, 64)  # SmolLM2-135M's chunk
    bf16 = 2 * 30 * 2 * 256 * 3 * 64
    k = 1 + 2 / 64  # per value: an int8 level, a bf16 scale per head of 64
    v = 0.5 + 4 / 64  # a 4-bit level, a bf16 minimum and step per group of 64
    assert quant.stored_bytes("k8v4", shape) == bf16 / 2 * (k + v) / 2
    assert quant.stored_bytes("int4r", shape) < quant.stored_bytes("k8v4", shape)
    assert quant.stored_bytes("k8v4", shape) / bf16 == pytest.approx(0.3984, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_k8v4_codes_k_as_k_where_a_cache_packs_k_and_v_in_runs(dtype: torch.dtype) -> None:
    """vLLM's AMX-packed CPU cache holds, per block and head, the block's K then its V: a
    chunk of it alternates K and V in runs of a block's tokens. With the runs, k8v4 stores
    exactly what it stores of the same KV in the chunk layout (K at 8 bits); without, half of
    each K would be coded at 4 bits."""
    shape, runs = (2, 2, 256, 3, 64), 128  # two blocks of 128 tokens, three heads
    kv = sample_kv(shape, dtype, seed=7)
    packed = levels4.scattered(kv, runs)  # the cache's order of the same KV
    assert torch.equal(levels4.gathered(packed, runs), kv) and not torch.equal(packed, kv)
    stored = quant.encode("k8v4", packed, runs=runs)
    assert torch.equal(stored, quant.encode("k8v4", kv))  # K coded as K
    assert torch.equal(stored, quant.encode("k8v4", packed, native=False, runs=runs))
    back = quant.decode("k8v4", stored, shape, dtype, runs=runs)
    assert torch.equal(back, quant.decode("k8v4", stored, shape, dtype, native=False, runs=runs))
    assert torch.equal(back, levels4.scattered(quant.decode("k8v4", stored, shape, dtype), runs))
    k_rows = levels4.gathered(packed, runs)[:, 0].float()
    blind = quant.decode("k8v4", quant.encode("k8v4", packed), shape, dtype)  # runs ignored
    errors = [
        (levels4.gathered(x, runs)[:, 0].float() - k_rows).norm() / k_rows.norm()
        for x in (back, blind)
    ]
    assert errors[0] < errors[1] / 2, errors
    with pytest.raises(ValueError, match="runs of 100 rows"):
        quant.encode("k8v4", packed, runs=100)  # 768 K rows a layer: not a divisor


def test_heads_the_kernel_does_not_take_are_encoded_by_torch(fresh: None) -> None:
    kv = sample_kv((2, 2, 40, 3, 96), torch.bfloat16, seed=4)  # 96: not a multiple of 32
    stored = torch.empty(quant.stored_bytes("int4r", tuple(kv.shape)), dtype=torch.uint8)
    assert not native.int4r("encode", kv, stored, (32, 64), 32)
    back = quant.decode("int4r", quant.encode("int4r", kv), tuple(kv.shape), torch.float32)
    assert (back - kv.float()).norm() / kv.float().norm() < 0.1


@pytest.mark.parametrize("name", quant4.ROTATED)
def test_a_kernel_that_disagrees_with_torch_is_never_used(
    fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    built = native.int4r

    def off_by_one(op: str, kv: torch.Tensor, stored: torch.Tensor, *rest: Any) -> bool:
        wrote = built(op, kv, stored, *rest)
        if op == "encode" and (rest[0][0] == 0) == (name == "k8v4"):
            stored[7] ^= 1  # a kernel miscompiled for one of the two codecs, say
        return wrote

    monkeypatch.setattr(native, "int4r", off_by_one)
    with caplog.at_level(logging.WARNING, "kvtier"):
        assert not quant4.native_int4r()
    assert f"native {name} kernel disagrees with torch" in caplog.text
    kv = sample_kv((2, 2, 16, 3, 64), torch.bfloat16, seed=2)
    for codec_name in quant4.ROTATED:
        want = quant.encode(codec_name, kv, native=False)
        assert torch.equal(quant.encode(codec_name, kv), want)


def test_an_outlier_channel_costs_the_others_less_than_in_int4() -> None:
    """V is grouped per token: in int4 a token's outlier channel sets the step of all its
    channels; rotated, its energy spreads over all of them and the step shrinks."""
    torch.manual_seed(0)
    shape = (2, 2, 256, 3, 64)
    kv = torch.randn(shape)
    kv[:, 1, :, :, 9] *= 25
    errors = {}
    for name in ("int4", "int4r"):
        back = quant.decode(name, quant.encode(name, kv), shape, torch.float32)
        others = [c for c in range(64) if c != 9]
        errors[name] = (back - kv)[:, 1, ..., others].pow(2).mean().item()
    assert errors["int4r"] < errors["int4"] / 2, errors


@pytest.mark.parametrize(
    ("name", "runs"), [("int4r", 0), ("k8v4", 0), ("k8v4", 128), ("int8", 0), ("zstd", 0)]
)
@pytest.mark.parametrize("kernel", [True, False])
def test_a_chunk_decoded_into_its_buffer_is_sealed_as_the_raw_chunk_it_holds(
    name: str, runs: int, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk or Redis hit lands in the front of a raw-sized buffer, is decoded there and
    becomes the raw chunk promoted to DRAM: int4r's kernel hashes what it writes for the
    checksum, other forms (and int4r without its kernel) are hashed after. Either way the
    buffer is exactly the raw chunk that encoding the decoded KV would store."""
    if not kernel:
        monkeypatch.setattr(quant4, "native_int4r", lambda: False)
    key = ChunkKey(bytes(range(16)))
    kv = sample_kv((3, 2, 256, 3, 64), torch.bfloat16, seed=9)
    raw = kv.reshape(-1).view(torch.uint8).numpy()
    chunk = KVChunk("bfloat16", tuple(kv.shape), raw, runs)
    stored = codec.encode(key, chunk, "ab" * 8, Compression.named(name), created_at=5.0)
    buf = codec.SealedChunk(codec.HEADER_BYTES + chunk.nbytes)
    buf[: len(stored)] = stored
    front = memoryview(buf)[: len(stored)]
    header = inflate.decode_into(front, memoryview(buf)[codec.HEADER_BYTES :], key, seal_into=buf)
    assert header.compression == Compression.named(name)
    decoded = codec.decode(bytes(buf), expected_key=key)  # its checksum verifies
    assert decoded.header.compression == Compression.NONE
    assert decoded.header.kv_runs == decoded.chunk.runs == runs  # kept for the next recode
    assert bytes(decoded.chunk.data) == bytes(codec.decode(stored).chunk.data)
    again = codec.encode(key, decoded.chunk, "ab" * 8, created_at=5.0)
    assert bytes(buf) == again
    buf[codec.HEADER_BYTES + 1000] ^= 1  # and the checksum covers the payload
    with pytest.raises(CorruptChunk):
        codec.decode(bytes(buf), expected_key=key)
