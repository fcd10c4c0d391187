"""Raw chunks opened with their payload's checksum left to the caller, which hashes the
payload as it copies it (:func:`kvtier.native.copy_hash`) and compares before the KV is used.

Why: a DRAM hit read each chunk twice at the memory's speed, once to verify it and once to
copy it into the engine's blocks (on a 2-core Xeon, 20 chunks of 5.9 MB: 17 ms of hashing
beside 19 ms of copying, on one thread). Hashing each block as it is copied reads it once.
Nothing is used unverified: a loader reports a chunk loaded only once its digest matched, and
a chunk that does not is removed as corrupt and recomputed (:meth:`TieredStore.corrupt`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier import codec
from kvtier.codec import Compression, KVChunk
from kvtier.errors import CorruptChunk
from kvtier.native import xxh3


@dataclass(frozen=True)
class PayloadCheck:
    """What the payload of a chunk opened by :func:`open_raw` must hash to."""

    prefix: memoryview  # the header's bytes the checksum covers, before the payload
    checksum: int
    payload: memoryview

    def holds(self, digest: int | None = None) -> bool:
        """Whether the payload hashes to the checksum: ``digest`` as the caller computed it
        while copying, else computed here."""
        if digest is None:
            digest = xxh3.checksum(self.prefix, self.payload)
        return digest == self.checksum


def open_raw(blob: object, expected_key: bytes) -> tuple[KVChunk, PayloadCheck] | None:
    """A stored raw chunk's KV and the check its payload must pass, everything but the
    payload's hash verified (header, size, key); None for a compressed or quantized chunk
    (:func:`kvtier.codec.decode` it). Raises CorruptChunk like it."""
    view = memoryview(blob).cast("B")  # type: ignore[arg-type]
    header = codec.read_header(view)
    if header.compression != Compression.NONE:
        return None
    if view.nbytes != codec.HEADER_BYTES + header.stored_bytes:
        raise CorruptChunk(
            f"chunk is {view.nbytes} bytes, header says {codec.HEADER_BYTES + header.stored_bytes}"
        )
    if header.key != expected_key:
        raise CorruptChunk(f"chunk {header.key.hex()} stored under key {expected_key.hex()}")
    payload = view[codec.HEADER_BYTES :]
    try:
        chunk = KVChunk(header.dtype, header.shape, payload)
    except ValueError as exc:
        raise CorruptChunk(f"chunk {header.key.hex()}: {exc}") from exc
    return chunk, PayloadCheck(view[: codec.PREFIX_BYTES], header.checksum, payload)
