"""Kernels kvtier compiles on the host it runs on, at first use: C, built by the system's
compiler for that CPU's own vector instructions (AVX-512 where the host has it, AVX2 where
not), loaded with ctypes (whose calls release the GIL).

Why not torch: encoding a chunk to int8 in torch takes seven passes over an fp32 copy of it
(0.9-1.4 GB/s on one thread of a 2-core Xeon), and the saver's thread shares the engine's two
cores: `kvtier bench ttft`'s no-reuse overhead with an int8 disk tier was 4-6% against 2-3%
raw. The C loop reads the chunk once.

Nothing here is required. Without a compiler, or where the build fails, kvtier uses torch
and says so once in its log; :mod:`kvtier.quant` also checks once per process that the
kernel writes what its torch path writes, and uses torch where it does not. How the library
is built and cached: :mod:`kvtier.native.build`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvtier.native.build import build

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvtier")

_KERNELS = (
    "kvtier_int8_encode_bf16",
    "kvtier_int8_encode_f32",
    "kvtier_int8_decode_bf16",
    "kvtier_int8_decode_f32",
)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built or do not agree with torch."""
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
        for name in _KERNELS:
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 2
        lib.kvtier_copy_many.restype = None
        lib.kvtier_copy_many.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 3
        for name in ("kvtier_int8_recode_bf16", "kvtier_int8_recode_f32"):
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 5
        lib.kvtier_int8_decode_table.restype = None
        rows_dim: list[Any] = [ctypes.c_int64] * 2
        lib.kvtier_int8_decode_table.argtypes = [
            ctypes.c_void_p, *rows_dim, ctypes.c_int, ctypes.c_int64, *[ctypes.c_void_p] * 3
        ]  # fmt: skip
        lib.kvtier_copy_hash.restype = None
        lib.kvtier_copy_hash.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5
        i64 = [ctypes.c_int64] * 8  # the shape, groups, rotation and K's runs
        lib.kvtier_int4r_encode.restype = None
        lib.kvtier_int4r_encode.argtypes = [
            ctypes.c_void_p, ctypes.c_int, *i64, *[ctypes.c_void_p] * 3
        ]  # fmt: skip
        lib.kvtier_int4r_decode.restype = None
        lib.kvtier_int4r_decode.argtypes = [
            ctypes.c_void_p,
            *i64,
            ctypes.c_void_p,
            ctypes.c_int,
            *[ctypes.c_void_p] * 3,
            ctypes.c_int64,
            *[ctypes.c_void_p] * 3,
        ]
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("kvtier: native kernels unavailable (%s); torch does their work, slower", e)
        return None
    return lib


def int8_encode(x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor) -> bool:
    """int8 levels and bf16 scales of ``x`` (contiguous bf16 or fp32, its last axis a row)
    into ``levels`` (int8, ``x``'s size) and ``scales`` (bf16, one per row), the arithmetic of
    :mod:`kvtier.quant`'s torch path (which checks, once, that the bytes are the same). False,
    nothing written, where the kernel is not available for ``x``."""
    kernel = _kernel("encode", x)
    if kernel is None:
        return False
    dim = x.shape[-1]
    if not (levels.numel() == x.numel() and scales.numel() * dim == x.numel()):
        raise ValueError(
            f"int8 of {tuple(x.shape)}: {levels.numel()} levels, {scales.numel()} scales"
        )
    if not (levels.is_contiguous() and scales.is_contiguous()):
        raise ValueError("int8 levels and scales must be contiguous")
    kernel(x.data_ptr(), x.numel() // dim, dim, levels.data_ptr(), scales.data_ptr())
    return True


def int8_decode(stored: torch.Tensor, dim: int, out: torch.Tensor) -> bool:
    """The values of ``stored`` (flat uint8: levels, then bf16 scales, one per row of
    ``dim``) into ``out`` (contiguous bf16 or fp32), which may begin where ``stored`` does
    (decoding in place, into the buffer the stored form was read into). False, nothing
    written, where the kernel is not available for ``out``."""
    import torch

    kernel = _kernel("decode", out)
    if kernel is None:
        return False
    rows = out.numel() // dim
    if rows * dim != out.numel() or stored.numel() != rows * (dim + 2):
        raise ValueError(f"{stored.numel()} stored bytes do not hold int8 of {out.numel()} values")
    if not stored.is_contiguous() or stored.dtype != torch.uint8:
        raise ValueError("a stored int8 payload is contiguous uint8")
    aside = torch.empty(rows, dtype=torch.int16)  # the scales, before the output covers them
    kernel(stored.data_ptr(), rows, dim, out.data_ptr(), aside.data_ptr())
    return True


def int8_decode_table(
    stored: torch.Tensor, dim: int, dtype: torch.dtype, rows: int, table: tuple[Any, Any, Any]
) -> bool:
    """int8's decode of ``stored`` (levels then bf16 scales of ``rows`` rows of ``dim``
    values) straight into its destinations: ``table``, int64 arrays of destination addresses,
    raw payload byte offsets and sizes, each a run of whole rows of ``dtype`` (bf16 or fp32)
    values. False, nothing written, where the kernel is not available or the copies are not
    whole rows."""
    import numpy as np
    import torch

    lib = library()
    bf16 = {torch.bfloat16: 1, torch.float32: 0}.get(dtype)
    if lib is None or bf16 is None or not 0 < dim <= 256:
        return False
    if stored.numel() != rows * (dim + 2) or not stored.is_contiguous():
        raise ValueError(f"{stored.numel()} stored bytes do not hold int8 of {rows} rows")
    dst, src, sizes = table
    row = dim * (2 if bf16 else 4)
    if (
        np.any(src % row)
        or np.any(sizes % row)
        or np.any(src < 0)
        or np.any(src + sizes > rows * row)
    ):
        return False
    lib.kvtier_int8_decode_table(
        stored.data_ptr(), rows, dim, bf16, len(dst), *(a.ctypes.data for a in table)
    )
    return True


def int4r(
    op: str,
    kv: torch.Tensor,
    stored: torch.Tensor,
    groups: tuple[int, int],
    rotation: int,
    hasher: tuple[int, Any] | None = None,
    copies: tuple[Any, Any, Any] | None = None,
    runs: int = 0,
) -> bool:
    """The rotating kernel's ``op`` (int4r, k8v4; "encode": ``kv`` into ``stored``; "decode":
    ``stored`` into ``kv``) where ``kv`` is a contiguous bf16 or fp32 payload ``(layers, 2,
    tokens, heads, dim)``, ``stored`` its stored form (contiguous uint8,
    :mod:`kvtier.quant4`'s layout), with K grouped over ``groups[0]`` tokens (0: in int8
    rows), V over ``groups[1]`` channels, each head rotated in blocks of ``rotation``
    channels. False, nothing written, where the kernel does not take
    that shape (the caller runs torch); the arithmetic is the torch path's. ``hasher``
    (:func:`kvtier.native.xxh3.updater`'s address and a started state): decoding, the output
    is hashed into the state as it is written; encoding, the input, layer by layer, as it is
    read. ``copies`` (decoding; int64 arrays of
    destination addresses, payload byte offsets and sizes, in payload order, each within one
    layer's K and V): the payload is not written to ``kv`` (only its shape and dtype count)
    but decoded layer by layer into a scratch and copied from there to those destinations.
    ``runs`` (k8v4): each layer's rows of ``dim`` values alternate K and V in runs of so many
    (0: the layer's K, then its V; :func:`kvtier.quant4.encode`)."""
    import torch

    lib = library()
    gk, gv = groups
    layers, _, tokens, heads, dim = kv.shape
    bf16 = {torch.bfloat16: 1, torch.float32: 0}.get(kv.dtype)
    fits = int4r_fits(tuple(kv.shape), groups, rotation, runs)
    fits = fits and kv.device.type in ("cpu", "meta")
    if lib is None or bf16 is None or not fits or not kv.is_contiguous() or kv.numel() == 0:
        return False
    if stored.device.type != "cpu":
        raise ValueError("a stored int4r payload is on the host")
    if not stored.is_contiguous() or stored.dtype != torch.uint8:
        raise ValueError("a stored int4r payload is contiguous uint8")
    shape = (layers, tokens, heads, dim, gk, gv, rotation, runs)
    update, state = hasher if hasher is not None else (None, None)
    if op == "encode":
        lib.kvtier_int4r_encode(
            kv.data_ptr(), bf16, *shape, stored.data_ptr(), update, state and state.ptr
        )
    else:
        scratch, table = None, (0, None, None, None)
        if copies is not None:
            scratch = torch.empty(2 * tokens * heads * dim, dtype=kv.dtype)
            table = (len(copies[0]), *(c.ctypes.data for c in copies))
        lib.kvtier_int4r_decode(
            stored.data_ptr(),
            *shape,
            None if copies is not None else kv.data_ptr(),
            bf16,
            update,
            state and state.ptr,
            None if scratch is None else scratch.data_ptr(),
            *table,
        )
    return True


def int4r_fits(
    shape: tuple[int, ...], groups: tuple[int, int], rotation: int, runs: int = 0
) -> bool:
    """Whether :func:`int4r`'s kernel takes a payload of ``shape`` grouped and rotated so:
    heads of a multiple of 32 channels up to 256, K groups of an even number of tokens up to
    32 (0: K in int8 rows, the k8v4 codec), V groups of a multiple of 32 dividing the head, the
    rotation its power-of-two block, K's ``runs`` (k8v4 only) dividing a layer's K rows."""
    gk, gv = groups
    dim = shape[-1]
    fits = len(shape) == 5 and shape[1] == 2 and dim <= 256 and dim % 32 == 0
    if runs:
        fits = fits and gk == 0 and runs > 0 and (shape[2] * shape[3]) % runs == 0
    return (
        fits
        and dim % gv == gv % 32 == 0
        and 0 <= gk <= 32
        and gk % 2 == 0
        and rotation == dim & -dim
    )


def _kernel(op: str, values: torch.Tensor) -> Any:
    """The int8 ``op`` ("encode", "decode") kernel for ``values`` (the KV side: contiguous,
    not empty, bf16 or fp32), or None."""
    import torch

    suffix = {torch.bfloat16: "bf16", torch.float32: "f32"}.get(values.dtype)
    if suffix is None or not values.is_contiguous() or values.numel() == 0:
        return None
    lib = library()
    return None if lib is None else getattr(lib, f"kvtier_int8_{op}_{suffix}")


def int8_recode(
    raw_prefix: Any, raw: Any, dtype: str, dim: int, out_prefix: Any, out: Any
) -> tuple[int, int] | None:
    """Encode the raw payload ``raw`` (bytes of ``dtype``, bf16 or fp32, rows of ``dim``)
    to int8 into ``out`` (levels, then bf16 scales: :func:`int8_encode`'s bytes) in one pass,
    hashing both as it goes: (xxh3 of ``raw_prefix`` + ``raw``, xxh3 of ``out_prefix`` +
    ``out``). None, nothing written, where the kernel or :mod:`kvtier.native.xxh3` is not
    available. The caller checks the first digest before using ``out``."""
    import numpy as np

    from kvtier.native import xxh3

    lib, hashers = library(), xxh3.updater(2)
    suffix = {"bfloat16": "bf16", "float32": "f32"}.get(dtype)
    if lib is None or hashers is None or suffix is None:
        return None
    update, (raw_state, out_state) = hashers
    source, dest = np.frombuffer(raw, dtype=np.uint8), np.frombuffer(out, dtype=np.uint8)
    rows = source.size // (dim * (2 if suffix == "bf16" else 4))
    if rows == 0 or dest.size != rows * (dim + 2):
        return None
    raw_state.start(raw_prefix)
    out_state.start(out_prefix)
    kernel = getattr(lib, f"kvtier_int8_recode_{suffix}")
    scales = dest.ctypes.data + rows * dim
    kernel(
        source.ctypes.data,
        rows,
        dim,
        dest.ctypes.data,
        scales,
        update,
        raw_state.ptr,
        out_state.ptr,
    )
    return raw_state.digest(), out_state.digest()


def copy_many(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Copy each (destination, source) pair of contiguous CPU tensors of the same dtype and
    size, in one call without the GIL. False, nothing copied, where the kernel is not
    available or a pair is not that (the caller copies with torch)."""
    lib = library()
    table = _table(pairs) if lib is not None else None
    if lib is None or table is None:
        return False
    lib.kvtier_copy_many(len(table[0]), *(t.ctypes.data for t in table))
    return True


def copy_table(table: tuple[Any, Any, Any]) -> bool:
    """:func:`copy_many` of a table: (destination addresses, source addresses, sizes), int64
    arrays of CPU memory the caller holds. False, nothing copied, without the kernel."""
    if (lib := library()) is None:
        return False
    lib.kvtier_copy_many(len(table[0]), *(t.ctypes.data for t in table))
    return True


def copy_hash(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], prefix: Any, payload: Any
) -> int | None:
    """:func:`copy_many` of pairs whose sources, in order, are exactly the bytes of
    ``payload`` (a chunk's, scattered into an engine's blocks), returning the xxh3-64 of
    ``prefix`` then ``payload`` (the chunk's checksum) computed as it copies: one read of the
    payload instead of two. None, nothing copied, where that does not hold or the kernel or
    :mod:`kvtier.native.xxh3` is not available (the caller hashes, then copies)."""
    table = _table(pairs) if library() is not None else None
    return None if table is None else copy_hash_table(table, prefix, payload)


def copy_hash_table(table: tuple[Any, Any, Any], prefix: Any, payload: Any) -> int | None:
    """:func:`copy_hash` of a table (:func:`copy_table`)."""
    import numpy as np

    from kvtier.native import xxh3

    lib, hasher = library(), xxh3.updater(1)
    if lib is None or hasher is None or not len(table[0]):
        return None
    dst, src, sizes = table
    order = np.argsort(src, kind="stable")
    dst, src, sizes = dst[order], src[order], sizes[order]
    base = np.frombuffer(payload, dtype=np.uint8)
    ends = src + sizes
    if src[0] != base.ctypes.data or ends[-1] != src[0] + base.size or (src[1:] != ends[:-1]).any():
        return None  # not the whole payload once, in order
    update, (state,) = hasher
    state.start(prefix)
    lib.kvtier_copy_hash(
        len(dst), dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, update, state.ptr
    )
    return state.digest()


def _table(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """(destination addresses, source addresses, sizes), int64 arrays, of pairs the C copies
    can move as bytes; None where one cannot be (the caller copies with torch)."""
    import numpy as np

    if not pairs:
        return None
    for dst, src in pairs:
        if not (dst.is_contiguous() and src.is_contiguous() and dst.device.type == "cpu"):
            return None
        if src.device.type != "cpu" or src.dtype != dst.dtype or src.numel() != dst.numel():
            return None  # torch converts dtypes; bytes alone would not
    table = np.array(
        [(d.data_ptr(), s.data_ptr(), d.numel() * d.element_size()) for d, s in pairs],
        dtype=np.int64,
    )
    return tuple(np.ascontiguousarray(table[:, i]) for i in range(3))
