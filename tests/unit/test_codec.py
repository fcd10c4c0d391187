"""The chunk codec: self-describing bytes; anything damaged is detected, never returned."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvtier import codec, deferred, inflate
from kvtier.codec import HEADER_BYTES, Compression, KVChunk
from kvtier.errors import CorruptChunk
from kvtier.keys import ChunkKey
from kvtier.recode import recode

from kvhelpers import chunk, same

KEY = ChunkKey(bytes(range(16)))


LOSSLESS = [c for c in Compression if not c.lossy]


@pytest.mark.parametrize("compression", LOSSLESS)
def test_round_trip(compression: Compression) -> None:
    original = chunk(1)
    blob = codec.encode(KEY, original, "0123456789abcdef", compression, created_at=1234.5)
    decoded = codec.decode(blob, expected_key=KEY)
    assert same(decoded.chunk, original)
    h = decoded.header
    assert (h.key, h.namespace_id, h.created_at) == (KEY, "0123456789abcdef", 1234.5)
    assert (h.dtype, h.shape, h.tokens, h.compression) == (
        "float16",
        original.shape,
        16,
        compression,
    )


def test_uncompressed_decode_does_not_copy() -> None:
    blob = codec.encode(KEY, chunk(1))
    data = codec.decode(blob).chunk.data
    assert isinstance(data, memoryview) and data.obj is blob


@pytest.mark.parametrize(
    "dtype,np_dtype",
    [("bfloat16", np.uint16), ("float32", np.float32), ("float8_e4m3fn", np.uint8)],
)
def test_dtypes_without_numpy_support_round_trip_as_raw_bits(dtype: str, np_dtype: type) -> None:
    arr: np.ndarray = np.arange(2 * 2 * 16 * 2 * 8).astype(np_dtype).reshape(2, 2, 16, 2, 8)
    c = KVChunk.from_array(arr, dtype)
    back = codec.decode(codec.encode(KEY, c)).chunk
    assert back.dtype == dtype and np.array_equal(back.numpy(), arr)


@pytest.mark.parametrize("compression", list(Compression))
def test_every_flipped_byte_is_detected(compression: Compression) -> None:
    blob = codec.encode(KEY, chunk(2), "00" * 8, compression)
    positions = list(range(HEADER_BYTES)) + list(range(HEADER_BYTES, len(blob), 97))
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x40
        with pytest.raises(CorruptChunk):
            codec.decode(bytes(damaged), expected_key=KEY)


def test_truncated_extended_and_misplaced_chunks_are_detected() -> None:
    blob = codec.encode(KEY, chunk(3))
    for bad in (blob[:50], blob[:-1], blob + b"\0", b"", b"KVTC" + blob[4:60]):
        with pytest.raises(CorruptChunk):
            codec.decode(bad, expected_key=KEY)
    with pytest.raises(CorruptChunk, match="stored under"):
        codec.decode(blob, expected_key=bytes(16))


def test_future_format_version_is_refused() -> None:
    blob = bytearray(codec.encode(KEY, chunk(3)))
    blob[4] = 99
    with pytest.raises(CorruptChunk, match="version"):
        codec.read_header(bytes(blob))


@pytest.mark.parametrize("compression", LOSSLESS)
def test_decode_into_copies_and_verifies(compression: Compression) -> None:
    original = chunk(4)
    blob = codec.encode(KEY, original, compression=compression)
    dest = np.empty(original.nbytes, dtype=np.uint8)
    inflate.decode_into(blob, memoryview(dest.data), expected_key=KEY)
    assert dest.tobytes() == bytes(original.data)
    damaged = bytearray(blob)
    damaged[-3] ^= 1
    with pytest.raises(CorruptChunk):
        inflate.decode_into(bytes(damaged), memoryview(dest.data), expected_key=KEY)
    with pytest.raises(ValueError, match="buffer"):
        inflate.decode_into(blob, memoryview(bytearray(10)), expected_key=KEY)


def test_verify_checks_a_chunk_held_in_two_pieces() -> None:
    blob = codec.encode(KEY, chunk(5))
    header, payload = blob[:HEADER_BYTES], bytearray(blob[HEADER_BYTES:])
    assert codec.verify(header, payload, KEY).key == KEY
    payload[0] ^= 1
    with pytest.raises(CorruptChunk):
        codec.verify(header, payload, KEY)


def test_bad_chunks_are_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="dtype"):
        KVChunk("float128", (1, 2, 1, 1, 1), b"\0" * 32)
    with pytest.raises(ValueError, match="shape"):
        KVChunk("float16", (2, 16), b"\0" * 64)
    with pytest.raises(ValueError, match="bytes"):
        KVChunk("float16", (1, 2, 1, 1, 4), b"\0" * 15)
    with pytest.raises(ValueError, match="dtype="):
        KVChunk.from_array(np.zeros((1, 2, 1, 1, 1), dtype=np.uint16))


def test_a_chunk_built_in_place_is_the_encoded_chunk() -> None:
    original = chunk(3)
    blob = codec.blank(KEY, "float16", original.shape, "0123456789abcdef", created_at=7.0)
    assert isinstance(blob, codec.SealedChunk)
    codec.payload_of(blob)[:] = memoryview(original.data).cast("B")
    with pytest.raises(CorruptChunk, match="checksum"):  # filled, not sealed yet
        codec.decode(blob)
    codec.seal(blob)
    assert bytes(blob) == codec.encode(KEY, original, "0123456789abcdef", created_at=7.0)
    assert same(codec.decode(blob, expected_key=KEY).chunk, original)


def test_blank_refuses_what_encode_refuses() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        codec.blank(ChunkKey(b"short"), "float16", (1, 2, 4, 1, 8))
    with pytest.raises(ValueError, match="unknown KV dtype"):
        codec.blank(KEY, "float64", (1, 2, 4, 1, 8))
    with pytest.raises(ValueError, match="5 positive sizes"):
        codec.blank(KEY, "float16", (1, 2, 0, 1, 8))


def test_pool_chunks_match_blank_and_the_pool_falls_back_when_dry() -> None:
    from kvtier.integrations.vllm.chunk_pool import ChunkPool

    shape = (2, 2, 4, 1, 8)
    size = codec.HEADER_BYTES + codec.payload_bytes("float16", shape)
    pool = ChunkPool()
    pool.reserve("float16", shape, 2 * size + size // 2)
    assert len(pool) == 2
    key = ChunkKey(bytes(range(16)))
    for _ in range(3):  # two from the pool, then a new one
        got = pool.take(key, "ab" * 8)
        assert bytes(got) == bytes(codec.blank(key, "float16", shape, "ab" * 8, got_created(got)))
    assert len(pool) == 0
    empty = ChunkPool()
    with pytest.raises(RuntimeError, match="before reserve"):
        empty.take(key, "ab" * 8)
    empty.reserve("float16", shape, 0)  # no reserve (a disk-first store): new chunks only
    assert len(empty) == 0 and len(empty.take(key, "ab" * 8)) == size
    with pytest.raises(ValueError, match="the buffer 10"):
        codec.stamp(codec.SealedChunk(10), key, "float16", shape)


def test_spare_buffers_serve_whole_chunks_and_tails_and_never_larger() -> None:
    from kvtier.integrations.vllm.chunk_pool import ChunkPool

    shape = (2, 2, 4, 1, 8)
    size = codec.HEADER_BYTES + codec.payload_bytes("float16", shape)
    pool = ChunkPool()
    pool.reserve("float16", shape, 3 * size)
    assert pool.spare(size + 1) is None and len(pool) == 3  # larger: not from the pool
    whole = pool.spare(size)
    assert whole is not None and len(whole) == size
    tail = pool.spare(size // 3)  # a tail's: a pool chunk cut to size
    assert tail is not None and len(tail) == size // 3 and len(pool) == 1
    tail[:] = bytes(range(size // 3))  # a buffer the reader writes whole
    assert pool.spare(size) is not None and pool.spare(size) is None  # dry


def got_created(blob: bytes | bytearray) -> float:
    created: float = codec.read_header(blob).created_at
    return created


@pytest.mark.parametrize("compression", [c for c in Compression if c.lossy])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lossy_codec_stores_fewer_bytes_and_decodes_to_the_engines_dtype(
    compression: Compression, dtype: str
) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    kv = torch.randn(2, 2, 256, 3, 64).to(getattr(torch, dtype))
    original = KVChunk(dtype, tuple(kv.shape), kv.reshape(-1).view(torch.uint8).numpy().tobytes())
    blob = codec.encode(KEY, original, "00" * 8, compression)
    decoded = codec.decode(blob, expected_key=KEY)
    h = decoded.header
    assert (h.dtype, h.shape, h.compression) == (dtype, original.shape, compression)
    assert h.raw_bytes == original.nbytes
    same_size = compression == Compression.BF16 and dtype == "bfloat16"
    assert h.stored_bytes == original.nbytes if same_size else h.stored_bytes < original.nbytes
    back = torch.frombuffer(bytearray(decoded.chunk.data), dtype=kv.dtype).view(kv.shape)
    error = ((back.float() - kv.float()).abs().amax() / kv.float().abs().amax()).item()
    bounds = {
        "bf16": 0.01,
        "int8": 0.01,
        "int8c": 0.01,
        "fp8": 0.07,
        "int4": 0.1,
        "int4r": 0.1,
        "k8v4": 0.1,
    }
    assert error < bounds[compression.name.lower()]
    dest = bytearray(original.nbytes)
    inflate.decode_into(blob, memoryview(dest), expected_key=KEY)
    assert bytes(dest) == bytes(decoded.chunk.data)
    # recode: between tiers of different forms, and back to raw for a DRAM tier
    raw_again = codec.decode(recode(blob, Compression.NONE)).chunk
    assert bytes(raw_again.data) == bytes(decoded.chunk.data)


def test_an_unknown_codec_byte_is_a_corrupt_chunk() -> None:
    blob = bytearray(codec.encode(KEY, chunk(4)))
    blob[6] = 99  # the compression byte: a codec this kvtier does not know
    with pytest.raises(CorruptChunk, match="compression code 99"):
        codec.decode(bytes(blob))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("dim", [64, 8])
def test_int8_recoding_in_one_pass_writes_the_bytes_of_verify_encode_and_hash(
    dtype_name: str, dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw chunk written to an int8 tier: hashed, encoded and its encoding hashed in one C
    pass (where kvtier's kernels run) -- the same stored bytes as the general path; a raw
    chunk that does not verify is never encoded under a new checksum."""
    import torch

    from kvtier import native, quant

    kv = (torch.randn(2, 2, 300, 3, dim) * 4).to(getattr(torch, dtype_name))
    chunk = KVChunk(dtype_name, tuple(kv.shape), kv.contiguous().view(torch.uint8).numpy().data)
    blob = codec.encode(KEY, chunk, "ab" * 8, Compression.NONE, created_at=5.0)
    general = codec.encode(KEY, chunk, "ab" * 8, Compression.INT8, created_at=5.0)
    calls: list[object] = []
    real = native.int8_recode

    def counted(*args: object) -> tuple[int, int] | None:
        calls.append(got := real(*args))  # type: ignore[arg-type]
        return got

    monkeypatch.setattr(native, "int8_recode", counted)
    assert bytes(recode(blob, Compression.INT8)) == bytes(general)
    assert quant.native_int8() and calls and calls[0] is not None  # the one-pass path ran
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(CorruptChunk, match="checksum"):
        recode(bytes(damaged), Compression.INT8)
    monkeypatch.setattr(native, "int8_recode", lambda *args: None)  # no kernel: the same bytes
    assert bytes(recode(blob, Compression.INT8)) == bytes(general)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize(("name", "runs"), [("int4r", 0), ("k8v4", 0), ("k8v4", 150)])
def test_rotated_recoding_in_one_pass_writes_the_bytes_of_verify_encode_and_hash(
    dtype_name: str, name: str, runs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw chunk written to an int4r or k8v4 tier: the kernel hashes each raw layer as it
    encodes it -- the same stored bytes as the general path; a raw chunk that does not verify
    is never encoded under a new checksum."""
    import torch

    from kvtier import quant4

    kv = (torch.randn(2, 2, 300, 3, 64) * 4).to(getattr(torch, dtype_name))
    raw = kv.contiguous().view(torch.uint8).numpy().data
    chunk = KVChunk(dtype_name, tuple(kv.shape), raw, runs)
    blob = codec.encode(KEY, chunk, "ab" * 8, Compression.NONE, created_at=5.0)
    compression = Compression.named(name)
    general = codec.encode(KEY, chunk, "ab" * 8, compression, created_at=5.0)
    assert codec.read_header(general).kv_runs == runs
    calls: list[object] = []
    real = quant4.hashed

    def counted(*args: Any) -> int | None:
        calls.append(got := real(*args))
        return got

    monkeypatch.setattr(quant4, "hashed", counted)
    assert bytes(recode(blob, compression)) == bytes(general)
    assert quant4.native_int4r() and calls and calls[0] is not None  # the one-pass path ran
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(CorruptChunk, match="checksum"):
        recode(bytes(damaged), compression)
    monkeypatch.setattr(quant4, "hashed", lambda *args: None)  # no kernel: the same bytes
    assert bytes(recode(blob, compression)) == bytes(general)


def test_a_chunk_of_k_and_v_in_runs_says_so_under_its_checksum() -> None:
    """An AMX-packed cache's chunk records its K/V runs (KVChunk.runs) in its header, under
    the checksum and in a format version older readers refuse: a reader that could not
    honour the runs would decode its k8v4 payload with K and V mixed up."""
    kv = np.arange(2 * 2 * 256 * 3 * 64, dtype=np.float32).reshape(2, 2, 256, 3, 64)
    chunk = KVChunk("float32", kv.shape, kv.tobytes(), runs=128)
    blob = bytearray(codec.encode(KEY, chunk, "ab" * 8, Compression.K8V4))
    decoded = codec.decode(bytes(blob), expected_key=KEY)
    assert decoded.header.kv_runs == decoded.chunk.runs == 128
    plain = codec.decode(codec.encode(KEY, KVChunk("float32", kv.shape, kv.tobytes())))
    assert plain.header.kv_runs == 0  # the chunk layout: format version 1, as before
    assert bytes(blob[4:6]) == (2).to_bytes(2, "little")
    old = bytearray(blob)
    old[4:6] = (1).to_bytes(2, "little")  # version 1 never has runs
    with pytest.raises(CorruptChunk, match="format version 1 with K/V runs 128"):
        codec.decode(bytes(old))
    blob[46] ^= 1  # the runs' field (after magic, version, codes, key, namespace, time, tokens)
    with pytest.raises(CorruptChunk):
        codec.decode(bytes(blob))
    with pytest.raises(CorruptChunk, match="chunk header: K and V in runs of 129"):
        deferred.open_stored(bytes(blob), KEY)  # refused as it is read, before any decoder
    with pytest.raises(ValueError, match="runs of 100 rows"):
        KVChunk("float32", kv.shape, kv.tobytes(), runs=100)
    with pytest.raises(ValueError, match="runs of 8 rows in a chunk of shape"):
        KVChunk.check_runs((4, 256), 8)  # runs only where a chunk has K/V rows (5 dims)
