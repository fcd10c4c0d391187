"""Lossy KV codecs: a chunk's payload stored in fewer bytes, decoded back to the engine's dtype.

A payload is ``(layers, 2, tokens, kv_heads, head_dim)``, K before V (:mod:`kvtier.codec`).

- ``bf16``: each value rounded to bfloat16 (nearest even). Lossless for a bf16 engine; half
  the bytes of an fp32 engine's KV (kvtier's engine computes in fp32 on CPUs without native
  bf16).
- ``int8``: symmetric, one bf16 scale per token and head (max |x| / 127): 66 bytes per 64
  values of a head of dim 64 against 128 in bf16 (0.52x).
- ``int8c``: int8 with K scaled per channel over groups of 64 tokens (as ``int4`` groups K)
  and V per token and head as ``int8``: the same bytes, K's outlier channels no longer set
  the scale of a whole token.
- ``fp8``: e4m3 with one bf16 scale per token and head (max |x| / 448): the same bytes as
  int8, more precision near zero, less at the top of the range.
- ``int4``: asymmetric 4-bit as KIVI groups it, 0.28x of bf16; ``int4r``: the same after a
  Hadamard rotation of each head, 0.30x; ``k8v4``: K as ``int8``, V as ``int4r``, 0.40x
  (:mod:`kvtier.quant4`).

Why these (docs/quantization.md says more): KIVI's per-channel K / per-token V grouping is the
simplest scheme that holds 4 bits without calibration; KVQuant's non-uniform levels and
pre-RoPE keys need the model's calibration and the engine's cooperation; CacheGen and KVTC
reach further (delta and entropy coding, PCA) at a decode cost kvtier would pay on every load
on CPU. Scales are bf16 (fp32's range in two bytes): fp16 underflows on near-zero groups.

Every function takes and returns torch tensors on the CPU; torch is imported where a codec
runs (kvtier's core does not need it).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

from kvtier import native as native_kernels
from kvtier import quant4
from kvtier.levels4 import bf16 as _bf16
from kvtier.levels4 import groups_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvtier")

LOSSY = ("bf16", "int8", "int8c", "fp8", "int4", "int4r", "k8v4")
FLOAT_KV = ("float32", "float16", "bfloat16")  # the KV dtypes a lossy codec takes
_SCALE_BYTES = 2  # bf16


def stored_bytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a payload of ``shape`` stored with codec ``name``."""
    layers, two, tokens, heads, dim = shape
    values = math.prod(shape)
    if name == "bf16":
        return 2 * values
    if name in ("int8", "fp8"):
        return values + _SCALE_BYTES * layers * two * tokens * heads
    if name == "int8c":  # K: a scale per channel and group of tokens; V: per token and head
        k_scales = layers * heads * dim * groups_of(tokens)[1]
        return values + _SCALE_BYTES * (k_scales + layers * tokens * heads)
    if name in ("int4", *quant4.ROTATED):
        return quant4.stored_bytes(name, shape)
    raise ValueError(f"unknown codec {name!r}; lossy codecs: {', '.join(LOSSY)}")


def encode(name: str, kv: torch.Tensor, native: bool = True, runs: int = 0) -> torch.Tensor:
    """``kv`` ``(layers, 2, tokens, heads, dim)`` (fp32, fp16 or bf16) stored with codec
    ``name``: a flat uint8 tensor of :func:`stored_bytes` bytes. ``native=False``: in torch
    even where :mod:`kvtier.native`'s kernel would encode (the same bytes, slower). ``runs``:
    each layer's K and V alternate in runs of so many rows (k8v4 codes them so; the other
    codecs code the payload as it is; :func:`kvtier.quant4.encode`)."""
    import torch

    if name == "bf16":
        out = kv.to(torch.bfloat16).reshape(-1).view(torch.uint8)
    elif name in ("int8", "fp8"):
        out = _encode_8(name, kv, native)
    elif name == "int8c":
        x = kv.float()
        k = _encode_8("int8", x[:, 1])  # V per token and head, as int8
        out = torch.cat([_encode_8c(x[:, 0].permute(0, 2, 3, 1)), k])
    elif name in ("int4", *quant4.ROTATED):
        out = quant4.encode(name, kv, native, runs)
    else:
        raise ValueError(f"unknown codec {name!r}; lossy codecs: {', '.join(LOSSY)}")
    assert out.numel() == stored_bytes(name, tuple(kv.shape)), (name, kv.shape)
    return out


def decode(
    name: str,
    stored: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    native: bool = True,
    runs: int = 0,
) -> torch.Tensor:
    """A payload of ``shape`` in ``dtype`` from its form ``stored`` (flat uint8) by codec
    ``name``, written into ``out`` when given (a tensor of that shape and dtype: the
    destination itself, no copy after). Raises ValueError when ``stored`` is not that codec's
    size for ``shape``. ``native=False``: in torch even where :mod:`kvtier.native` would.
    ``runs``: as :func:`encode` took it."""
    import torch

    want = stored_bytes(name, shape)
    if stored.numel() != want:
        raise ValueError(f"a {name} payload of shape {shape} is {want} bytes, got {stored.numel()}")
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    if name == "bf16":
        return out.copy_(stored.view(torch.bfloat16).view(shape))
    if name in ("int8", "fp8"):
        return _decode_8(name, stored, shape, out, native)
    layers, _, tokens, heads, dim = shape
    if name == "int8c":
        split = stored_bytes("int8c", shape) - stored_bytes("int8", (layers, 1, tokens, heads, dim))
        out[:, 0] = _decode_8c(stored[:split], (layers, heads, dim, tokens)).permute(0, 3, 1, 2)
        _decode_8("int8", stored[split:], (layers, tokens, heads, dim), out[:, 1])
        return out
    return quant4.decode(name, stored, shape, out, native, runs)


def tensor_of(data: bytes | memoryview, dtype: str) -> torch.Tensor:
    """A flat tensor viewing ``data`` (read-only bytes included: only ever read)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=getattr(torch, dtype))


def encode_bytes(
    name: str, dtype: str, shape: tuple[int, ...], data: bytes | memoryview, runs: int = 0
) -> memoryview:
    """:func:`encode` for a chunk's payload held as bytes of ``dtype`` (kvtier.codec's)."""
    if dtype not in FLOAT_KV:
        raise ValueError(f"the {name} codec takes float KV, not {dtype}")
    return memoryview(encode(name, tensor_of(data, dtype).view(shape), runs=runs).numpy())


def decode_bytes(
    name: str, dtype: str, shape: tuple[int, ...], stored: bytes | memoryview, runs: int = 0
) -> memoryview:
    """:func:`decode` of a stored payload into new bytes of ``dtype`` (kvtier.codec's)."""
    import torch

    kv = decode(name, tensor_of(stored, "uint8"), shape, getattr(torch, dtype), runs=runs)
    return memoryview(kv.reshape(-1).view(torch.uint8).numpy())


def decode_bytes_into(
    name: str,
    dtype: str,
    shape: tuple[int, ...],
    stored: bytes | memoryview,
    dest: memoryview,
    hash_prefix: bytes | None = None,
    runs: int = 0,
) -> int | None:
    """:func:`decode_bytes` straight into ``dest`` (writable, the raw payload's size).

    ``stored`` may be the front of ``dest`` itself (a chunk read into the buffer it is decoded
    into): int8 decodes there in place (:mod:`kvtier.native`), other codecs from a copy.
    With ``hash_prefix``: the xxh3-64 of it then ``dest``'s decoded bytes where the codec
    computes it as it writes them (int4r's and k8v4's kernel), else None (the caller hashes)."""
    import torch

    out = torch.frombuffer(dest, dtype=getattr(torch, dtype)).view(shape)
    src = tensor_of(stored, "uint8")
    start, end = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
    overlaps = start < src.data_ptr() + src.numel() and src.data_ptr() < end
    in_place = name == "int8" and dtype in ("bfloat16", "float32") and native_int8()
    if overlaps and not in_place:
        src = src.clone()
    if hash_prefix is not None and name in quant4.ROTATED:
        digest = quant4.decode_hashed(name, src, shape, out, hash_prefix, runs)
        if digest is not None:
            return digest
    decode(name, src, shape, out.dtype, out, runs=runs)
    return None


def _encode_8(name: str, kv: torch.Tensor, native: bool = True) -> torch.Tensor:
    """Levels then bf16 scales of ``kv`` (any float dtype), computed in place in one fp32 copy
    and written straight into the output. Measured on one thread of a 2-core Xeon, a 5.9 MB
    bf16 chunk: 4.1 ms, against 6.3 ms with a new tensor for each step (absolute values,
    quotient, levels) and a concatenation at the end. (Reductions over a head's 64 values
    are the slow part; ``aminmax`` on bf16 was slower still, 5.2 ms alone.)

    int8 of bf16 or fp32 KV goes through :mod:`kvtier.native`'s kernel where it is built and
    writes the same bytes as this path (checked once: :func:`native_int8`)."""
    import torch

    values = kv.numel()
    scales = values // kv.shape[-1]
    out = torch.empty(values + scales * _SCALE_BYTES, dtype=torch.uint8)
    if native and name == "int8" and native_int8():
        x = kv.contiguous()
        levels, scale_out = out[:values].view(torch.int8), out[values:].view(torch.bfloat16)
        if native_kernels.int8_encode(x, levels, scale_out):
            return out
    top = 127.0 if name == "int8" else 448.0
    x = kv.to(torch.float32, copy=True)
    amax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    scale = _bf16(torch.where(amax > 0, amax / top, torch.ones_like(amax)))
    x.div_(scale)
    if name == "int8":
        out[:values].view(torch.int8).view(kv.shape).copy_(x.round_().clamp_(-127, 127))
    else:
        out[:values].view(torch.float8_e4m3fn).view(kv.shape).copy_(x.clamp_(-448, 448))
    out[values:].view(torch.bfloat16).view(scale.shape).copy_(scale)
    return out


@functools.cache
def native_int8() -> bool:
    """Whether :mod:`kvtier.native`'s int8 kernels are built and write, on a sample with
    all-zero rows, an outlier, exact halves between levels and subnormal values, the bytes
    this module's torch path writes: encoding, decoding, and decoding in place (the stored
    form at the front of the output). A kernel that does not is never used: a miscompiled one
    must not store or load wrong KV."""
    import torch

    if native_kernels.library() is None:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 33, 3, 64, generator=g) * 3
    x[0, 0, 0] = 0.0
    x[1, 1, 5, 0, 7] = 900.0
    x[0, 1, 2, 1] = torch.arange(64) - 31.5
    x[1, 0, 3] = torch.linspace(-1e-30, 1e-30, 64 * 3).view(3, 64)
    for dtype in (torch.float32, torch.bfloat16):
        kv = x.to(dtype)
        shape, values = tuple(kv.shape), kv.numel()
        want = _encode_8("int8", kv, native=False)
        got = torch.empty_like(want)
        levels, scales = got[:values].view(torch.int8), got[values:].view(torch.bfloat16)
        same = native_kernels.int8_encode(kv, levels, scales) and torch.equal(got, want)
        back = _decode_8("int8", want, shape, torch.empty_like(kv), native=False)
        front = torch.zeros(values * kv.element_size(), dtype=torch.uint8)
        front[: want.numel()] = want
        for stored, out in ((want, torch.empty_like(kv).view(-1)), (front[: want.numel()], front)):
            out = out.view(dtype)
            wrote = native_kernels.int8_decode(stored, shape[-1], out)
            same = same and wrote and torch.equal(out.view(shape), back)
        same = same and _decodes_scattered(want, shape, back)
        if not same:
            log.warning("kvtier: the native int8 kernels disagree with torch; torch runs int8")
            return False
    return True


def int8_decodes_in_place(shape: tuple[int, ...], dtype: str) -> bool:
    """Whether an int8 chunk of ``shape`` and ``dtype`` decodes straight into an engine's
    blocks here (:func:`int8_decode_scattered`): the kernels run and write that dtype."""
    fits = dtype in ("bfloat16", "float32") and len(shape) == 5 and 0 < shape[-1] <= 256
    return fits and native_int8()


def int8_decode_scattered(
    stored: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, table: tuple[Any, Any, Any]
) -> bool:
    """int8's :func:`decode` of a payload of ``shape`` straight into its destinations
    (``table``: destination addresses, raw payload byte offsets and sizes, each whole rows of
    a head): False, nothing written, where the kernel is not used (the caller decodes into a
    raw buffer, then copies)."""
    if stored.numel() != (want := stored_bytes("int8", shape)):
        raise ValueError(f"an int8 payload of shape {shape} is {want} bytes, got {stored.numel()}")
    rows = math.prod(shape[:-1])
    return native_int8() and native_kernels.int8_decode_table(stored, shape[-1], dtype, rows, table)


def _decodes_scattered(stored: torch.Tensor, shape: tuple[int, ...], want: torch.Tensor) -> bool:
    """Whether the table decoder writes ``want`` (the torch decode of ``stored``) through
    copies of one row, of many, and out of order."""
    import numpy as np
    import torch

    out = torch.zeros_like(want).view(-1)
    row = shape[-1] * want.element_size()
    rows = out.numel() * want.element_size() // row
    starts = np.array([rows - 1, 0, 1, rows // 2], dtype=np.int64)
    counts = np.array([1, 1, rows // 2 - 1, rows - 1 - rows // 2], dtype=np.int64)
    table = (out.data_ptr() + starts * row, starts * row, counts * row)
    wrote = native_kernels.int8_decode_table(stored, shape[-1], want.dtype, rows, table)
    return wrote and torch.equal(out.view(shape), want)


def _decode_8(
    name: str, stored: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor, native: bool = True
) -> torch.Tensor:
    """Into ``out``: the codes converted in one pass, then scaled in place (no temporary).
    The scales are bf16: into a bf16 ``out`` they multiply as they are (the product is the
    same, rounded once, and torch's mixed bf16 x fp32 multiply ran at 0.72 GB/s on a 2-core
    Xeon where this runs at 7.6)."""
    import torch

    flat = out.view(-1) if out.is_contiguous() else None
    if name == "int8" and native and flat is not None and native_int8():  # noqa: SIM102
        if native_kernels.int8_decode(stored, shape[-1], flat):
            return out
    values = math.prod(shape)
    scale = stored[values:].view(torch.bfloat16).view(*shape[:-1], 1)
    if out.dtype != torch.bfloat16:
        scale = scale.float()
    if name == "int8":
        return out.copy_(stored[:values].view(torch.int8).view(shape)).mul_(scale)
    # e4m3 -> fp16 by moving bits: sign to bit 15, exponent and mantissa up by 7, which reads
    # as the value / 256 (normals and subnormals alike; the encoder never writes NaN). torch's
    # own fp8 -> fp32 conversion ran at 0.9 GB/s here, this at 3.0.
    i = stored[:values].to(torch.int16)
    half = (((i & 0x80) << 8) | ((i & 0x7F) << 7)).view(torch.float16).view(shape)
    return out.copy_(half).mul_(scale * 256.0)


def _encode_8c(x: torch.Tensor) -> torch.Tensor:
    """int8 of ``x`` with a bf16 scale per group of 64 along its last axis (max |x| / 127
    over the group; the last group may be shorter): levels, then scales."""
    import torch

    size = x.shape[-1]
    group, groups = groups_of(size)
    pad = groups * group - size
    padded = torch.nn.functional.pad(x, (0, pad)) if pad else x
    amax = padded.reshape(*x.shape[:-1], groups, group).abs().amax(dim=-1)
    scale = _bf16(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)))
    full = scale.repeat_interleave(group, dim=-1)[..., :size]
    q = (x / full).round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat([q.reshape(-1), scale.to(torch.bfloat16).reshape(-1).view(torch.uint8)])


def _decode_8c(stored: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The values of ``shape`` :func:`_encode_8c` stored."""
    import torch

    values = math.prod(shape)
    group, groups = groups_of(shape[-1])
    scale = stored[values:].view(torch.bfloat16).view(*shape[:-1], groups).float()
    full = scale.repeat_interleave(group, dim=-1)[..., : shape[-1]]
    return stored[:values].view(torch.int8).view(shape).float().mul_(full)
