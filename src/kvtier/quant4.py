"""The 4-bit KV codecs of :mod:`kvtier.quant`.

- ``int4``: asymmetric 4-bit as KIVI does (K per channel over groups of 64 tokens, since K's
  outliers sit in fixed channels; V per token over groups of 64 channels), a bf16 minimum and
  step per group: 36 bytes per 64 values (0.28x of bf16).
- ``int4r``: each token's head first rotated by a normalized Walsh-Hadamard transform (as
  QuaRot rotates before quantizing): the rotation is orthogonal, so attention scores and
  outputs are unchanged, but a head's outlier channels spread their energy over all of them
  and a group's range shrinks to what its values need. Then KIVI's grouping, with K's groups
  of 32 tokens: 0.30x of bf16. Decoding applies the same transform (its own inverse) after
  dequantizing.
- ``k8v4``: K as ``int8`` stores it (one bf16 scale per token and head), V as ``int4r``
  does: 0.40x of bf16, since keys carry most of int4r's loss. A payload whose layers hold K
  and V in alternate runs of rows (``runs``: vLLM's AMX-packed CPU cache, each block's heads K
  then V, moved as opaque bytes) is coded as if those runs were gathered K first: its K rows
  int8, its V rows int4r, with no copy (the chunk header says the runs, :mod:`kvtier.codec`).

Why these forms, and what each measured on SmolLM2-135M: docs/quantization.md.

A head of ``dim`` channels rotates in blocks of the largest power of two dividing it (all of
it for heads of 64 or 128). The transform runs as butterflies, ``log2(block)`` stages of sums
and differences then a multiply by ``1/sqrt(block)``, in this module's torch path and in
:mod:`kvtier.native`'s kernel alike, so both write the same bytes (checked once per process:
:func:`native_int4r`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from typing import TYPE_CHECKING, Any

from kvtier import native as native_kernels
from kvtier.chunk import KVChunk
from kvtier.levels4 import (
    GROUP,
    decode4,
    encode4,
    gathered,
    grouped,
    groups_of,
    levels4,
    pack_halves,
    rotate,
    rotation_of,
    scattered,
    unpack_halves,
    values4,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvtier")

GROUP_K_ROTATED = 32  # int4r: tokens per K group
ROTATED = ("int4r", "k8v4")  # the codecs of the rotating kernel (V rotated; int4r's K too)
_SCALE_BYTES = 2  # bf16


def stored_bytes(name: str, shape: tuple[int, ...]) -> int:
    layers, _, tokens, heads, dim = shape
    if name == "k8v4":
        return _k8_bytes(shape) + _bytes4((layers, tokens, heads, dim))
    k_group = GROUP_K_ROTATED if name == "int4r" else GROUP
    return _bytes4((layers, heads, dim, tokens), k_group) + _bytes4((layers, tokens, heads, dim))


def _k8_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of k8v4's K: a level per value, a bf16 scale per token and head."""
    layers, _, tokens, heads, dim = shape
    return layers * tokens * heads * (dim + _SCALE_BYTES)


def _bytes4(shape: tuple[int, ...], group: int = GROUP) -> int:
    """Bytes :func:`encode4` stores for ``shape``, grouped along its last axis."""
    size, groups = groups_of(shape[-1], group)
    rows = math.prod(shape[:-1]) * groups
    return rows * size // 2 + 2 * _SCALE_BYTES * rows


def encode(name: str, kv: torch.Tensor, native: bool = True, runs: int = 0) -> torch.Tensor:
    """``kv`` ``(layers, 2, tokens, heads, dim)`` stored as ``int4``, ``int4r`` or ``k8v4``:
    K's groups (channels over tokens; k8v4: int8 rows) then V's (tokens over channels), each
    levels then [min, step]s (k8v4's K: levels then scales). ``runs`` (k8v4; 0: the chunk
    layout): each layer's rows of ``dim`` values alternate K and V in runs of so many."""
    import torch

    runs = _runs(name, kv.shape, runs)
    if name in ROTATED and native:
        out = torch.empty(stored_bytes(name, tuple(kv.shape)), dtype=torch.uint8)
        if _kernel(name, "encode", kv.contiguous(), out, runs=runs):
            return out
    if name == "k8v4":
        from kvtier import quant  # kvtier.quant imports this module

        kv = gathered(kv, runs)
        k = quant.encode("int8", kv[:, :1], native=False)
        return torch.cat([k, _encode_v4r(rotate(kv[:, 1].float()))])
    x = kv.float()
    if name == "int4r":
        return _encode4r(rotate(x))
    # K per channel over groups of tokens (its outliers sit in fixed channels), V per token
    # over groups of channels: each with its grouped axis last.
    return torch.cat([encode4(x[:, 0].permute(0, 2, 3, 1)), encode4(x[:, 1])])


def decode(
    name: str,
    stored: torch.Tensor,
    shape: tuple[int, ...],
    out: torch.Tensor,
    native: bool = True,
    runs: int = 0,
) -> torch.Tensor:
    """The payload :func:`encode` stored, into ``out`` (of ``shape``)."""
    layers, _, tokens, heads, dim = shape
    runs = _runs(name, shape, runs)
    kernel = native and out.is_contiguous() and name in ROTATED
    if kernel and _kernel(name, "decode", out, stored, runs=runs):
        return out
    if name == "int4r":
        return out.copy_(rotate(_decode4r(stored, shape)))
    if name == "k8v4":
        from kvtier import quant

        split = _k8_bytes(shape)
        kv = out if not runs else out.new_empty(shape)
        quant.decode("int8", stored[:split], (layers, 1, tokens, heads, dim), out.dtype,
                     kv[:, :1], native=False)  # fmt: skip
        kv[:, 1] = rotate(_decode_v4r(stored[split:], shape))
        return out if not runs else out.copy_(scattered(kv, runs))
    split = _bytes4((layers, heads, dim, tokens))
    out[:, 0] = decode4(stored[:split], (layers, heads, dim, tokens)).permute(0, 3, 1, 2)
    out[:, 1] = decode4(stored[split:], (layers, tokens, heads, dim))
    return out


def _encode4r(x: torch.Tensor) -> torch.Tensor:
    """int4r's stored form of rotated KV ``x`` (fp32). K: per (layer, head, group of tokens),
    ``group / 2`` rows of ``dim`` bytes (byte b of a channel holds the group's tokens b and
    b + group / 2, low nibble first), then that group's ``dim`` minima and ``dim`` steps (bf16).
    V: per token and head, each group of channels as ``group / 2`` bytes (byte i: channels i
    and i + group / 2), then per group [min, step]. Halves rather than neighbours share a byte
    so that the kernel packs and unpacks whole vectors."""
    import torch

    # K grouped over tokens: (layers, heads, dim, groups, size), stored channels last
    q, params = levels4(grouped(x[:, 0].permute(0, 2, 3, 1), GROUP_K_ROTATED))
    k_levels = pack_halves(q).permute(0, 1, 3, 4, 2)  # (layers, heads, groups, size / 2, dim)
    k_params = params.permute(0, 1, 3, 4, 2)  # (layers, heads, groups, 2, dim)
    k = torch.cat([k_levels.reshape(-1), k_params.contiguous().view(torch.uint8).reshape(-1)])
    return torch.cat([k, _encode_v4r(x[:, 1])])


def _encode_v4r(v: torch.Tensor) -> torch.Tensor:
    """int4r's V of rotated ``v`` ``(layers, tokens, heads, dim)`` (fp32): each token's head
    in groups of channels, levels (two to a byte, halves sharing) then [min, step]s."""
    import torch

    levels, params = levels4(grouped(v, GROUP))
    return torch.cat(
        [pack_halves(levels).reshape(-1), params.contiguous().view(torch.uint8).reshape(-1)]
    )


def _decode4r(stored: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The rotated KV (fp32, ``shape``) :func:`_encode4r` stored."""
    import torch

    layers, _, tokens, heads, dim = shape
    size, groups = groups_of(tokens, GROUP_K_ROTATED)
    lead = (layers, heads, groups)
    n_levels = math.prod(lead) * size // 2 * dim
    n_params = math.prod(lead) * 2 * dim * _SCALE_BYTES
    k_levels = stored[:n_levels].view(*lead, size // 2, dim).transpose(3, 4)
    k_params = stored[n_levels : n_levels + n_params].view(torch.bfloat16).view(*lead, 2, dim)
    k = values4(unpack_halves(k_levels), k_params.transpose(3, 4))  # (.., dim, size)
    k = k.permute(0, 2, 4, 1, 3).reshape(layers, groups * size, heads, dim)[:, :tokens]
    return torch.stack([k, _decode_v4r(stored[n_levels + n_params :], shape)], dim=1)


def _decode_v4r(stored: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The rotated V (fp32, ``(layers, tokens, heads, dim)``) :func:`_encode_v4r` stored."""
    import torch

    layers, _, tokens, heads, dim = shape
    v_size, v_groups = groups_of(dim)
    rows = (layers, tokens, heads, v_groups)
    v_levels = stored[: math.prod(rows) * v_size // 2].view(*rows, v_size // 2)
    v_params = stored[math.prod(rows) * v_size // 2 :].view(torch.bfloat16).view(*rows, 2)
    v = values4(unpack_halves(v_levels), v_params).reshape(layers, tokens, heads, -1)
    return v[..., :dim]


def _runs(name: str, shape: Any, runs: int) -> int:
    """The runs codec ``name`` codes a payload of ``shape`` by: k8v4's, checked (0 for the
    others: they code the chunk layout, whatever it holds)."""
    if name != "k8v4" or not runs:
        return 0
    KVChunk.check_runs(tuple(shape), runs)
    return 0 if runs == int(shape[2]) * int(shape[3]) else runs


def decode_hashed(
    name: str,
    stored: torch.Tensor,
    shape: tuple[int, ...],
    out: torch.Tensor,
    prefix: bytes,
    runs: int = 0,
) -> int | None:
    """:func:`decode` of ``name`` (int4r, k8v4) through the kernel, hashing ``out`` as it is
    written: the xxh3-64 of ``prefix`` then the decoded payload (a raw chunk's checksum, with
    its header's ``prefix``). None, nothing written, where the kernel or xxh3's C functions
    do not run."""
    _check_size(name, stored, shape)
    return hashed(name, "decode", out, stored, prefix, runs)


def hashed(
    name: str, op: str, kv: torch.Tensor, stored: torch.Tensor, prefix: bytes, runs: int = 0
) -> int | None:
    """The kernel's ``op`` of codec ``name`` (int4r, k8v4; "encode": ``kv`` into ``stored``,
    "decode": ``stored`` into ``kv``) hashing ``kv`` as it goes: the xxh3-64 of ``prefix``
    then ``kv``'s bytes. None, nothing written, where the kernel or xxh3's C functions do not
    run or do not take ``kv``."""
    from kvtier.native import xxh3

    hashers = xxh3.updater(1)
    if hashers is None or not kv.is_contiguous():
        return None
    update, (state,) = hashers
    state.start(prefix)
    runs = _runs(name, kv.shape, runs)
    done = _kernel(name, op, kv, stored, hasher=(update, state), runs=runs)
    return state.digest() if done else None


def _check_size(name: str, stored: torch.Tensor, shape: tuple[int, ...]) -> None:
    if stored.numel() != (want := stored_bytes(name, shape)):
        raise ValueError(f"a {name} payload of shape {shape} is {want} bytes, got {stored.numel()}")


def decodes_in_place(name: str, shape: tuple[int, ...], dtype: str, runs: int = 0) -> bool:
    """Whether a chunk of codec ``name`` (int4r, k8v4), ``shape`` and ``dtype`` decodes
    straight into an engine's blocks here: the kernel runs, takes the shape, and writes that
    dtype."""
    if dtype not in ("bfloat16", "float32") or len(shape) != 5 or not native_int4r():
        return False
    runs = _runs(name, shape, runs)
    groups = _groups4r(name, shape)
    return native_kernels.int4r_fits(shape, groups, rotation_of(shape[-1]), runs)


def decode_scattered(
    name: str,
    stored: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    copies: tuple[Any, Any, Any],
    runs: int = 0,
) -> bool:
    """:func:`decode` of codec ``name`` (int4r, k8v4): a payload of ``shape`` and ``dtype``
    straight into its destinations: ``copies`` as :func:`kvtier.native.int4r` takes them
    (each layer decoded into a scratch while the copies out of it run). False, nothing
    written, where the kernel does not run or take the shape (the caller decodes, then
    copies)."""
    import torch

    _check_size(name, stored, shape)
    meta = torch.empty(shape, dtype=dtype, device="meta")
    return _kernel(name, "decode", meta, stored, copies=copies, runs=_runs(name, shape, runs))


def _kernel(
    name: str,
    op: str,
    kv: torch.Tensor,
    stored: torch.Tensor,
    hasher: tuple[int, Any] | None = None,
    copies: tuple[Any, Any, Any] | None = None,
    runs: int = 0,
) -> bool:
    """:func:`kvtier.native.int4r` with codec ``name``'s groups and rotation for ``kv``'s
    shape (and K's ``runs``, checked by :func:`_runs`), where the kernel runs and writes this
    module's bytes; False where it does not (run torch)."""
    shape = tuple(kv.shape)
    groups, rotation = _groups4r(name, shape), rotation_of(shape[-1])
    return native_int4r() and native_kernels.int4r(
        op, kv, stored.contiguous(), groups, rotation, hasher, copies, runs
    )


def _groups4r(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """Codec ``name``'s (tokens per K group, channels per V group) for a payload of ``shape``,
    as the kernel takes them: int4r's K in groups of tokens, k8v4's (0) in int8 rows."""
    k_group = groups_of(shape[2], GROUP_K_ROTATED)[0] if name == "int4r" else 0
    return k_group, groups_of(shape[4])[0]


@functools.cache
def native_int4r() -> bool:
    """Whether :mod:`kvtier.native`'s int4r kernel is built and writes this module's bytes
    (for int4r and k8v4),
    encoding and decoding, bf16 and fp32, on a sample with a short last group of tokens, an
    all-zero head, a constant one and an outlier channel. A kernel that does not is never
    used."""
    import torch

    if native_kernels.library() is None:
        return False
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 2, 45, 3, 64), (1, 2, 20, 2, 128)):  # heads of 64 run their own loops
        x = torch.randn(shape, generator=g)
        x[:, 0, :, :, 3] *= 30
        x[0, 0, :, 1] = 0.0
        x[0, 1, :, 0] = 2.5
        cases = [(n, 0) for n in ROTATED] + [("k8v4", shape[2] * shape[3] // 5)]  # K/V runs
        for dtype, (name, runs) in itertools.product((torch.float32, torch.bfloat16), cases):
            kv = x.to(dtype)
            groups, rotation = _groups4r(name, shape), rotation_of(shape[-1])
            want = encode(name, kv, native=False, runs=runs)
            got = torch.empty_like(want)
            ok = native_kernels.int4r("encode", kv, got, groups, rotation, None, None, runs)
            back = decode(name, want, shape, torch.empty_like(kv), native=False, runs=runs)
            out = torch.empty_like(kv)
            ok = ok and native_kernels.int4r(
                "decode", out, want, groups, rotation, None, None, runs
            )
            if not (ok and torch.equal(got, want) and torch.equal(out, back)):
                log.warning(
                    "kvtier: the native %s kernel disagrees with torch; torch runs it", name
                )
                return False
    return True
