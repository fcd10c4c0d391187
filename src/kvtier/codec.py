"""Chunk codec: self-describing, checksummed bytes for one chunk of KV.

Layout (little-endian, fixed 96-byte header, then the payload)::

    0  magic "KVTC"        4   version u16          6  compression u8     7  dtype u8
    8  key (16 bytes)      24  namespace id (8)      32 created_at f64 (unix seconds)
    40 tokens u32          44  ndim u8 + 3 zero      48 shape: 6 x u32 (unused dims 0)
    72 stored length u64   80  raw length u64        88 checksum u64 (xxh3-64)
    96 payload (stored length bytes; compressed when compression != 0)

The checksum covers header bytes 0..88 *and* the stored payload, so a flipped bit anywhere,
a truncated file or a chunk stored under the wrong key all fail :func:`decode`, which raises
:class:`CorruptChunk` and never returns data.

The payload is engine-independent: one contiguous array of shape
``(layers, 2, tokens, kv_heads, head_dim)``, K before V in each layer (an MLA model stores its
latent as ``(layers, 1, tokens, 1, latent_dim)``). Any engine or device with the same model
reads what another one wrote.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from enum import IntEnum

import lz4.frame
import numpy as np
import zstandard

from kvtier import quant
from kvtier.chunk import DTYPES as DTYPES
from kvtier.chunk import KVChunk as KVChunk
from kvtier.errors import CorruptChunk
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.native import xxh3

MAGIC = b"KVTC"
SEALED_MAGIC = b"KVTE"  # kvtier.sealing's form, returned by a tier when it fails to open
FORMAT_VERSION = 1
RUNS_VERSION = 2  # a header whose chunk holds K and V in runs (older readers refuse it)
HEADER_BYTES = 96
MAX_NDIM = 6
_PREFIX = struct.Struct("<4sHBB16s8sdIBxH6IQQ")  # everything the checksum covers
_CHECKSUM = struct.Struct("<Q")
PREFIX_BYTES = _PREFIX.size  # the header's bytes hashed before the payload
assert _PREFIX.size + _CHECKSUM.size == HEADER_BYTES


class Compression(IntEnum):
    """How a payload is stored: as it is, compressed losslessly, or by a lossy codec of
    :mod:`kvtier.quant` (decoded back to the header's dtype)."""

    NONE = 0
    ZSTD = 1
    LZ4 = 2
    BF16 = 3
    INT8 = 4
    FP8 = 5
    INT4 = 6
    INT8C = 7
    INT4R = 8
    K8V4 = 9

    @property
    def lossy(self) -> bool:
        return self >= Compression.BF16

    @classmethod
    def named(cls, name: str) -> Compression:
        try:
            return cls[name.upper()]
        except KeyError:
            allowed = ", ".join(c.name.lower() for c in cls)
            raise ValueError(f"unknown compression {name!r}; allowed: {allowed}") from None


_DTYPE_BY_CODE = {code: name for name, (code, _, _) in DTYPES.items()}


@dataclass(frozen=True)
class ChunkHeader:
    """What the first 96 bytes of a stored chunk say (not verified until :func:`decode`)."""

    key: ChunkKey
    namespace_id: str
    created_at: float
    dtype: str
    shape: tuple[int, ...]
    tokens: int
    compression: Compression
    stored_bytes: int
    raw_bytes: int
    checksum: int
    kv_runs: int = 0  # K and V alternate in runs of so many rows (KVChunk.runs; 0: the layout)


@dataclass(frozen=True)
class DecodedChunk:
    header: ChunkHeader
    chunk: KVChunk


def prefix_of(header: ChunkHeader, compression: Compression, stored_bytes: int) -> bytes:
    """The checksummed header bytes of ``header``'s chunk stored in another form."""
    return _PREFIX.pack(
        *_prefix_fields(
            header.key,
            header.dtype,
            header.shape,
            header.namespace_id,
            compression,
            header.created_at,
            stored_bytes,
            header.kv_runs,
        )
    )


def _prefix_fields(
    key: ChunkKey,
    dtype: str,
    shape: tuple[int, ...],
    namespace_id: str,
    compression: Compression,
    created_at: float | None,
    stored_bytes: int,
    runs: int = 0,
) -> tuple[object, ...]:
    """The header fields the checksum covers, in ``_PREFIX`` order."""
    ns = bytes.fromhex(namespace_id) if namespace_id else b""
    raw_bytes = int(np.prod(shape)) * DTYPES[dtype][1]
    return (
        MAGIC,
        RUNS_VERSION if runs else FORMAT_VERSION,
        int(compression),
        DTYPES[dtype][0],
        key,
        ns.ljust(8, b"\0")[:8],
        time.time() if created_at is None else created_at,
        shape[2],
        len(shape),
        runs,
        *shape,
        *[0] * (MAX_NDIM - len(shape)),
        stored_bytes,
        raw_bytes,
    )


def encode(
    key: ChunkKey,
    chunk: KVChunk,
    namespace_id: str = "",
    compression: Compression = Compression.NONE,
    created_at: float | None = None,
) -> bytes:
    """Serialize ``chunk`` under ``key``; the result is what every tier stores."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
    raw = memoryview(chunk.data).cast("B")
    payload: bytes | memoryview
    if compression == Compression.ZSTD:
        payload = zstandard.ZstdCompressor(level=1).compress(raw)
    elif compression == Compression.LZ4:
        payload = lz4.frame.compress(raw)
    elif compression.lossy:
        name = compression.name.lower()
        payload = quant.encode_bytes(name, chunk.dtype, chunk.shape, raw, chunk.runs)
    else:
        payload = raw
    prefix = _PREFIX.pack(
        *_prefix_fields(
            key,
            chunk.dtype,
            chunk.shape,
            namespace_id,
            compression,
            created_at,
            len(payload),
            chunk.runs,
        )
    )
    return b"".join((prefix, _CHECKSUM.pack(xxh3.checksum(prefix, payload)), payload))


class SealedChunk(bytearray):
    """A chunk encoded in place, to skip the copy :func:`encode` makes.

    :func:`blank` lays out the header and room for the payload, the caller fills
    :func:`payload_of` (say, gathering KV straight out of an engine's cache), and
    :func:`seal` writes the checksum. Once sealed nobody writes to it again, so a tier may
    keep it as it is instead of copying it into ``bytes``.
    """


def blank(
    key: ChunkKey,
    dtype: str,
    shape: tuple[int, ...],
    namespace_id: str = "",
    created_at: float | None = None,
    runs: int = 0,
) -> SealedChunk:
    """An uncompressed chunk with its header written and its payload still to fill
    (``runs``: :attr:`kvtier.chunk.KVChunk.runs`)."""
    nbytes = payload_bytes(dtype, shape)
    blob = SealedChunk(HEADER_BYTES + nbytes)
    return stamp(blob, key, dtype, shape, namespace_id, created_at, runs)


def stamp(
    blob: SealedChunk,
    key: ChunkKey,
    dtype: str,
    shape: tuple[int, ...],
    namespace_id: str = "",
    created_at: float | None = None,
    runs: int = 0,
) -> SealedChunk:
    """Make a fresh (all-zero) buffer of the right size a :func:`blank` chunk; returns it.

    For buffers allocated ahead of time, off the path that fills them.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
    nbytes = payload_bytes(dtype, shape)
    if len(blob) != HEADER_BYTES + nbytes:
        raise ValueError(
            f"a {dtype} chunk of shape {shape} is {HEADER_BYTES + nbytes} bytes,"
            f" the buffer {len(blob)}"
        )
    KVChunk.check_runs(shape, runs)
    fields = _prefix_fields(
        key, dtype, shape, namespace_id, Compression.NONE, created_at, nbytes, runs
    )
    _PREFIX.pack_into(blob, 0, *fields)
    return blob


def payload_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"unknown KV dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if len(shape) != 5 or any(d <= 0 for d in shape):
        raise ValueError(f"KV chunk shape must be 5 positive sizes, got {shape}")
    return int(np.prod(shape)) * DTYPES[dtype][1]


def payload_of(blob: SealedChunk) -> memoryview:
    """The writable payload of a chunk from :func:`blank`."""
    return memoryview(blob)[HEADER_BYTES:]


def seal(blob: SealedChunk) -> SealedChunk:
    """Write the checksum of a filled :func:`blank` chunk; returns it."""
    view = memoryview(blob)
    _CHECKSUM.pack_into(
        blob, _PREFIX.size, xxh3.checksum(view[: _PREFIX.size], view[HEADER_BYTES:])
    )
    return blob


def read_header(blob: bytes | bytearray | memoryview) -> ChunkHeader:
    """Parse the header without verifying the payload; raises CorruptChunk if malformed."""
    view = memoryview(blob)
    if view.nbytes < HEADER_BYTES:
        raise CorruptChunk(f"chunk is {view.nbytes} bytes, shorter than its header")
    fields = _PREFIX.unpack_from(view)
    magic, version, comp, dcode, key, ns, created, tokens, ndim, runs = fields[:10]
    dims, stored, raw = fields[10:16], fields[16], fields[17]
    if magic == SEALED_MAGIC:
        raise CorruptChunk(
            "a sealed chunk that does not open: tampered with, moved to another key, or"
            " sealed under a master key this server does not hold (see kvtier.sealing)"
        )
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {magic!r}")
    if version != (RUNS_VERSION if runs else FORMAT_VERSION):
        raise CorruptChunk(
            f"format version {version} with K/V runs {runs} (this kvtier reads"
            f" {FORMAT_VERSION}, and {RUNS_VERSION} with runs)"
        )
    if dcode not in _DTYPE_BY_CODE or comp not in Compression._value2member_map_:
        raise CorruptChunk(f"unknown dtype code {dcode} or compression code {comp}")
    if not 1 <= ndim <= MAX_NDIM:
        raise CorruptChunk(f"bad ndim {ndim}")
    try:  # runs the chunk's shape cannot hold: no codec may be handed them
        KVChunk.check_runs(tuple(dims[:ndim]), runs)
    except ValueError as exc:
        raise CorruptChunk(f"chunk header: {exc}") from None
    (checksum,) = _CHECKSUM.unpack_from(view, _PREFIX.size)
    return ChunkHeader(
        key=ChunkKey(bytes(key)),
        namespace_id=bytes(ns).hex(),
        created_at=created,
        dtype=_DTYPE_BY_CODE[dcode],
        shape=tuple(dims[:ndim]),
        tokens=tokens,
        compression=Compression(comp),
        stored_bytes=stored,
        raw_bytes=raw,
        checksum=checksum,
        kv_runs=runs,
    )


def verify(
    header_bytes: bytes | bytearray | memoryview,
    payload: bytes | bytearray | memoryview,
    expected_key: bytes | None = None,
) -> ChunkHeader:
    """Check a chunk held as two pieces (header, stored payload), e.g. read straight into a
    caller's buffer. Raises CorruptChunk when size, magic, version, checksum or key is off."""
    header = read_header(header_bytes)
    stored = memoryview(payload).nbytes
    if stored != header.stored_bytes:
        raise CorruptChunk(f"chunk payload is {stored} bytes, header says {header.stored_bytes}")
    _check(xxh3.checksum(memoryview(header_bytes)[: _PREFIX.size], payload), header, expected_key)
    return header


def _check(digest: int, header: ChunkHeader, expected_key: bytes | None) -> None:
    if digest != header.checksum:
        raise CorruptChunk(f"checksum mismatch for chunk {header.key.hex()}")
    if expected_key is not None and header.key != expected_key:
        raise CorruptChunk(f"chunk {header.key.hex()} stored under key {expected_key.hex()}")


def decode(blob: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> DecodedChunk:
    """Verify and parse a stored chunk. Uncompressed payloads are returned without a copy.

    Raises CorruptChunk when anything is off: size, magic, version, checksum, key.
    """
    view = memoryview(blob).cast("B")
    if view.nbytes < HEADER_BYTES:
        raise CorruptChunk(f"chunk is {view.nbytes} bytes, shorter than its header")
    payload = view[HEADER_BYTES:]
    header = verify(view[:HEADER_BYTES], payload, expected_key)
    data: bytes | memoryview = payload
    try:
        if header.compression == Compression.ZSTD:
            data = zstandard.ZstdDecompressor().decompress(
                payload, max_output_size=header.raw_bytes
            )
        elif header.compression == Compression.LZ4:
            data = lz4.frame.decompress(payload)
        elif header.compression.lossy:
            name = header.compression.name.lower()
            data = quant.decode_bytes(name, header.dtype, header.shape, payload, header.kv_runs)
    except Exception as exc:  # a verified payload that fails to inflate is still corrupt
        raise CorruptChunk(f"cannot decompress chunk {header.key.hex()}: {exc}") from exc
    try:
        chunk = KVChunk(header.dtype, header.shape, data, header.kv_runs)
    except ValueError as exc:
        raise CorruptChunk(f"chunk {header.key.hex()}: {exc}") from exc
    return DecodedChunk(header, chunk)


def join(
    header: bytearray, payload: memoryview, into: SealedChunk | None = None
) -> bytes | SealedChunk:
    """The stored form of a chunk held as (header, payload), as loaded by ``get_into``.

    ``into``: a buffer of the stored form's size (one whose pages are already touched, say)
    to copy it into instead of new ``bytes``; ignored when the sizes differ."""
    h = read_header(header)
    if h.compression == Compression.NONE:
        if into is not None and len(into) == len(header) + payload.nbytes:
            into[: len(header)] = header
            into[len(header) :] = payload
            return into
        return bytes(header) + bytes(payload)
    chunk = KVChunk(h.dtype, h.shape, payload, h.kv_runs)
    return encode(h.key, chunk, h.namespace_id, Compression.NONE, h.created_at)
