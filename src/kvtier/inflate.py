"""Decoding a stored chunk straight into a caller's buffer, verified as it goes: the form a
load reads from disk or Redis lands in (:mod:`kvtier.reads`), decoded, and (``seal_into``) made
the raw chunk that is promoted to DRAM, its checksum computed by the decoder where it can."""

from __future__ import annotations

import xxhash

from kvtier import quant
from kvtier.codec import (
    _CHECKSUM,
    _PREFIX,
    HEADER_BYTES,
    ChunkHeader,
    Compression,
    SealedChunk,
    _check,
    decode,
    prefix_of,
    read_header,
    seal,
    verify,
)
from kvtier.errors import CorruptChunk

_BLOCK = 256 * 1024  # copy+hash block: stays in L2 between the copy and the hash


def decode_into(
    blob: bytes | bytearray | memoryview,
    dest: memoryview,
    expected_key: bytes | None = None,
    seal_into: SealedChunk | None = None,
) -> ChunkHeader:
    """Verify a stored chunk while copying its KV payload into ``dest``, in one pass.

    Copy and checksum go block by block, so each block is hashed while still in cache: about
    0.9x a bare memcpy here, where copy-then-hash costs 0.7x. ``dest`` must be exactly the
    payload's size (ValueError otherwise, which is not a corruption). Raises CorruptChunk like
    :func:`decode`; then ``dest`` holds garbage and must not be used.

    ``seal_into``: the buffer whose payload ``dest`` is (a chunk stored smaller than its raw
    form, read into the front of it), stamped and sealed afterwards as the raw chunk (what
    :func:`kvtier.codec.stamp` and :func:`kvtier.codec.seal` write); a codec whose decoder
    hashes what it writes (int4r's kernel) gives the checksum without another pass. Returns
    the stored chunk's header.
    """
    view = memoryview(blob).cast("B")
    header = read_header(view)
    if header.compression.lossy:  # decoded straight into dest: no copy after
        verify(view[:HEADER_BYTES], view[HEADER_BYTES:], expected_key)
        if header.raw_bytes != dest.nbytes:
            raise ValueError(
                f"chunk holds {header.raw_bytes} bytes of KV, the buffer {dest.nbytes}"
            )
        name = header.compression.name.lower()
        raw_prefix = None if seal_into is None else prefix_of(header, Compression.NONE, dest.nbytes)
        try:
            digest = quant.decode_bytes_into(
                name,
                header.dtype,
                header.shape,
                view[HEADER_BYTES:],
                dest,
                raw_prefix,
                header.kv_runs,
            )
        except Exception as exc:  # a verified payload that fails to decode is still corrupt
            raise CorruptChunk(f"cannot decode chunk {header.key.hex()}: {exc}") from exc
        _reseal(seal_into, raw_prefix, digest)
        return header
    if header.compression != Compression.NONE:
        chunk = decode(view, expected_key).chunk
        if chunk.nbytes != dest.nbytes:
            raise ValueError(f"chunk holds {chunk.nbytes} bytes of KV, the buffer {dest.nbytes}")
        dest[:] = memoryview(chunk.data).cast("B")
        if seal_into is not None:
            _reseal(seal_into, prefix_of(header, Compression.NONE, dest.nbytes), None)
        return header
    if view.nbytes != HEADER_BYTES + header.stored_bytes:
        raise CorruptChunk(
            f"chunk is {view.nbytes} bytes, header says {HEADER_BYTES + header.stored_bytes}"
        )
    if header.raw_bytes != dest.nbytes:
        raise ValueError(f"chunk holds {header.raw_bytes} bytes of KV, the buffer {dest.nbytes}")
    hasher = xxhash.xxh3_64(view[: _PREFIX.size])
    for start in range(0, dest.nbytes, _BLOCK):
        block = dest[start : start + _BLOCK]
        block[:] = view[HEADER_BYTES + start : HEADER_BYTES + start + _BLOCK]
        hasher.update(block)
    _check(hasher.intdigest(), header, expected_key)
    return header


def _reseal(blob: SealedChunk | None, prefix: bytes | None, digest: int | None) -> None:
    """Give ``blob`` (a raw chunk's buffer, its payload filled) the header ``prefix`` and its
    checksum: ``digest`` where the decoder computed it, else hashed here."""
    if blob is None or prefix is None:
        return
    blob[: _PREFIX.size] = prefix
    if digest is None:
        seal(blob)
    else:
        _CHECKSUM.pack_into(blob, _PREFIX.size, digest)
