"""A chunk moved into another tier's stored form (:func:`recode`): tiers differ in codec.

A raw chunk written to an int8, int4r or k8v4 tier is recoded in one pass where kvtier's C
kernels run (:func:`kvtier.native.int8_recode`, :func:`kvtier.quant4.hashed`): the raw payload
hashed block by block (or layer by layer) as it is encoded, straight into the buffer that is
stored. The general path verifies the raw chunk (a hash pass), encodes it, hashes the encoded
payload and joins it to its header (a copy). Per 5.9 MB bf16 chunk not in cache, on one thread
of a 2-core Xeon (a writer's thread, which a no-reuse engine pays on the cores it computes on):
int8 3.3 ms, 2.8 in one pass; k8v4 4.2-4.8 ms, 3.7-3.9 in one pass. Both write the same bytes
(tested).
"""

from __future__ import annotations

from kvtier import codec, native, quant, quant4
from kvtier.codec import Compression, KVChunk
from kvtier.errors import CorruptChunk
from kvtier.native import xxh3


def recode(
    blob: bytes | bytearray | memoryview, compression: Compression
) -> bytes | bytearray | memoryview:
    """``blob`` stored with ``compression`` (itself when it already is). Raises CorruptChunk
    when ``blob`` does not verify: nothing corrupt is ever re-encoded under a new checksum."""
    header = codec.read_header(blob)
    if header.compression == compression:
        return blob
    if header.compression == Compression.NONE and compression in FUSED:
        fused = _fused(blob, header, compression)
        if fused is not None:
            return fused
    chunk = codec.decode(blob).chunk
    return codec.encode(header.key, chunk, header.namespace_id, compression, header.created_at)


FUSED = (Compression.INT8, Compression.INT4R, Compression.K8V4)  # the one-pass recodes


def _fused(
    blob: bytes | bytearray | memoryview, header: codec.ChunkHeader, compression: Compression
) -> bytearray | None:
    """:func:`recode` of a raw chunk in one pass, or None where it cannot run."""
    name = compression.name.lower()
    view = memoryview(blob).cast("B")
    kernel = quant.native_int8() if compression == Compression.INT8 else quant4.native_int4r()
    if view.nbytes != codec.HEADER_BYTES + header.stored_bytes or not kernel:
        return None  # a size the header does not say: codec.decode reports it
    raw = view[codec.HEADER_BYTES :]
    try:
        KVChunk(header.dtype, header.shape, raw, header.kv_runs)
        stored = quant.stored_bytes(name, header.shape)
    except ValueError:
        return None  # a shape that does not fit: codec.decode reports it
    out = bytearray(codec.HEADER_BYTES + stored)
    prefix = codec.prefix_of(header, compression, stored)
    payload = memoryview(out)[codec.HEADER_BYTES :]
    raw_prefix = view[: codec.PREFIX_BYTES]
    if compression == Compression.INT8:
        digests = native.int8_recode(
            raw_prefix, raw, header.dtype, header.shape[-1], prefix, payload
        )
    else:
        digests = _rotated(name, header, raw_prefix, raw, prefix, payload)
    if digests is None:
        return None
    if digests[0] != header.checksum:
        raise CorruptChunk(f"checksum mismatch for chunk {header.key.hex()}")
    out[: codec.PREFIX_BYTES] = prefix
    out[codec.PREFIX_BYTES : codec.HEADER_BYTES] = digests[1].to_bytes(8, "little")
    return out


def _rotated(
    name: str,
    header: codec.ChunkHeader,
    raw_prefix: memoryview,
    raw: memoryview,
    prefix: bytes,
    payload: memoryview,
) -> tuple[int, int] | None:
    """int4r's or k8v4's encode of ``raw`` into ``payload``, the raw payload hashed layer by
    layer as the kernel reads it: (xxh3 of the raw chunk, of the stored one), or None."""
    import torch

    if header.dtype not in ("bfloat16", "float32"):
        return None
    kv = quant.tensor_of(raw, header.dtype).view(header.shape)
    out = torch.frombuffer(payload, dtype=torch.uint8)
    digest = quant4.hashed(name, "encode", kv, out, bytes(raw_prefix), header.kv_runs)
    return None if digest is None else (digest, xxh3.checksum(prefix, payload))
