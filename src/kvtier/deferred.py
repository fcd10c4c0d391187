"""Chunks whose last step is left to the caller, which does it as it places their KV:

- raw chunks opened with their payload's checksum left to the caller, which hashes the
  payload as it copies it (:func:`kvtier.native.copy_hash`) and compares before the KV is used
  (:func:`open_raw`);
- int4r, k8v4 and int8 chunks opened verified but not decoded (:func:`open_stored`): the caller
  decodes them straight into the engine's blocks (int4r layer by layer through a scratch that
  stays in cache, int8 row by row), instead of decoding 5.9 MB into a raw chunk and copying
  that into the blocks (a disk hit of 19 int4r chunks on a 2-core Xeon: 42 against 80 ms,
  the memory written once).

Why: a DRAM hit read each chunk twice at the memory's speed, once to verify it and once to
copy it into the engine's blocks (on a 2-core Xeon, 20 chunks of 5.9 MB: 17 ms of hashing
beside 19 ms of copying, on one thread). Hashing each block as it is copied reads it once.
Nothing is used unverified: a loader reports a chunk loaded only once its digest matched, and
a chunk that does not is removed as corrupt and recomputed (:meth:`TieredStore.corrupt`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvtier import codec, quant, quant4
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
        chunk = KVChunk(header.dtype, header.shape, payload, header.kv_runs)
    except ValueError as exc:
        raise CorruptChunk(f"chunk {header.key.hex()}: {exc}") from exc
    return chunk, PayloadCheck(view[: codec.PREFIX_BYTES], header.checksum, payload)


@dataclass(frozen=True)
class StoredForm:
    """A chunk's verified stored form that the caller decodes into its destination."""

    name: str  # the codec
    dtype: str  # the raw KV's
    shape: tuple[int, ...]
    payload: memoryview  # the stored payload, checksum verified
    runs: int = 0  # K and V's runs in the raw payload (kvtier.chunk.KVChunk.runs)

    @property
    def raw_bytes(self) -> int:
        return codec.payload_bytes(self.dtype, self.shape)

    def fits(self, chunk: Any) -> bool:
        """Whether ``chunk`` (the tensor a load places it from) is of this form's shape and
        dtype: else it is another model's, or corrupt."""
        return self.shape == tuple(chunk.shape) and self.dtype == str(chunk.dtype).removeprefix(
            "torch."
        )

    def place(self, chunk: Any, table: Any, copy: Callable[[], object]) -> bool:
        """Decode into the blocks: straight through ``table`` (destination addresses, payload
        byte offsets, sizes: each layer decoded into a scratch and copied out while in cache)
        where given and the kernel takes it, else into ``chunk`` (its own raw-sized host
        buffer) and then ``copy()``. False where the payload does not decode (corrupt) or
        ``copy`` returns False."""
        import torch

        try:
            stored = torch.frombuffer(self.payload, dtype=torch.uint8)
            scattered = IN_PLACE[Compression.named(self.name)][1]
            if table is not None and scattered(stored, self.shape, chunk.dtype, table, self.runs):
                return True
            dest = memoryview(chunk.view(-1).view(torch.uint8).numpy())
            quant.decode_bytes_into(
                self.name, self.dtype, self.shape, self.payload, dest, runs=self.runs
            )
        except ValueError:  # a payload of the wrong size: what the codec refuses is corrupt
            return False
        return copy() is not False


def open_stored(blob: object, expected_key: bytes) -> StoredForm | None:
    """A chunk's stored form, verified (checksum, size, key), for a codec whose decoder writes
    straight into an engine's blocks (int4r, k8v4 and int8, where their kernels run and take the
    chunk's shape and dtype); None for other chunks. Raises CorruptChunk like
    :func:`kvtier.codec.decode`."""
    view = memoryview(blob).cast("B")  # type: ignore[arg-type]
    header = codec.read_header(view)
    if header.compression not in IN_PLACE:
        return None
    if not IN_PLACE[header.compression][0](header.shape, header.dtype, header.kv_runs):
        return None  # decoded here, held raw in DRAM
    if view.nbytes != codec.HEADER_BYTES + header.stored_bytes:
        raise CorruptChunk(
            f"chunk is {view.nbytes} bytes, header says {codec.HEADER_BYTES + header.stored_bytes}"
        )
    header = codec.verify(view[: codec.HEADER_BYTES], view[codec.HEADER_BYTES :], expected_key)
    try:
        codec.payload_bytes(header.dtype, header.shape)
    except ValueError as exc:
        raise CorruptChunk(f"chunk {header.key.hex()}: {exc}") from exc
    name = header.compression.name.lower()
    payload = view[codec.HEADER_BYTES :]
    return StoredForm(name, header.dtype, header.shape, payload, header.kv_runs)


def _int8_fits(shape: tuple[int, ...], dtype: str, runs: int = 0) -> bool:
    return quant.int8_decodes_in_place(shape, dtype)  # rows alike, wherever K and V lie


def _int8_scattered(stored: Any, shape: tuple[int, ...], dtype: Any, table: Any, runs: int) -> bool:
    return quant.int8_decode_scattered(stored, shape, dtype, table)


# The codecs a load decodes into place: whether it does for a shape, dtype and K/V runs, and
# the decoder through a table of copies (False: the caller decodes into the chunk, then
# copies).
IN_PLACE: dict[
    Compression, tuple[Callable[[tuple[int, ...], str, int], bool], Callable[..., bool]]
] = {
    Compression.INT4R: (
        partial(quant4.decodes_in_place, "int4r"),
        partial(quant4.decode_scattered, "int4r"),
    ),
    Compression.K8V4: (
        partial(quant4.decodes_in_place, "k8v4"),
        partial(quant4.decode_scattered, "k8v4"),
    ),
    Compression.INT8: (_int8_fits, _int8_scattered),
}
