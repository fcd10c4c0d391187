"""The torch arithmetic of kvtier's 4-bit codecs (:mod:`kvtier.quant4`): groups, 4-bit levels
with a bf16 minimum and step per group, two levels to a byte, the normalized Walsh-Hadamard
rotation, and K/V runs gathered into the chunk layout. :mod:`kvtier.native`'s kernel does the
same operations in the same order, so both write the same bytes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GROUP = 64  # tokens per K group (int4), channels per V group (fewer when the axis is shorter)


def groups_of(size: int, group: int = GROUP) -> tuple[int, int]:
    """(group size, groups) along an axis of ``size``: groups of ``group`` (even: two levels to
    a byte), the last padded."""
    group = min(group, size + size % 2)
    return group, -(-size // group)


def rotation_of(dim: int) -> int:
    """The block int4r rotates a head of ``dim`` channels in: the largest power of two
    dividing ``dim``."""
    return dim & -dim


def bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16 and back to fp32: the scale a decoder will see."""
    import torch

    return x.to(torch.bfloat16).float()


def grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` with its last axis split in groups of ``group`` (:func:`groups_of`): the last
    group padded with its last value, so that its range is its own."""
    import torch

    size, groups = groups_of(x.shape[-1], group)
    pad = groups * size - x.shape[-1]
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], groups, size)


def pack_halves(q: torch.Tensor) -> torch.Tensor:
    """Levels along the last axis (even length) two to a byte: the first half's in the low
    nibbles, the second half's in the high."""
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def unpack_halves(packed: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def gathered(kv: torch.Tensor, runs: int) -> torch.Tensor:
    """``kv`` whose layers hold K and V in alternate runs of ``runs`` rows (of its last
    axis) as the chunk layout holds them: each layer's K rows, then its V rows (0: as it is)."""
    if not runs:
        return kv
    layers, _, tokens, heads, dim = kv.shape
    runs_kv = kv.reshape(layers, tokens * heads // runs, 2, runs, dim)
    return runs_kv.transpose(1, 2).reshape(kv.shape)


def scattered(kv: torch.Tensor, runs: int) -> torch.Tensor:
    """The inverse of :func:`gathered`."""
    if not runs:
        return kv
    layers, _, tokens, heads, dim = kv.shape
    by_kind = kv.reshape(layers, 2, tokens * heads // runs, runs, dim)
    return by_kind.transpose(1, 2).reshape(kv.shape)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) with each run of :func:`rotation_of` its last axis's size multiplied by the
    normalized Walsh-Hadamard matrix: butterflies of sums and differences at strides 1, 2,
    4, ..., then one multiply (the kernel's operations, in its order)."""
    import numpy as np
    import torch

    dim = x.shape[-1]
    block = rotation_of(dim)
    y = x.reshape(-1, dim)
    h = 1
    while h < block:
        pairs = y.view(y.shape[0], dim // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2).view(-1, dim)
        h *= 2
    scale = np.float32(1.0) / np.sqrt(np.float32(block))
    return y.mul(torch.tensor(scale, dtype=torch.float32)).view(x.shape)


def pack4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 along the last axis (even length) two to a byte, low nibble first."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(-1)


def unpack4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).view(shape)


def levels4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit over the last axis: (levels 0..15 as uint8, [min, step] in bf16)."""
    import torch

    lo = bf16(x.amin(dim=-1, keepdim=True))
    hi = x.amax(dim=-1, keepdim=True)
    step = bf16(torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)))
    q = ((x - lo) / step).round_().clamp_(0, 15).to(torch.uint8)
    params = torch.cat([lo, step], dim=-1).to(torch.bfloat16)
    return q, params


def values4(q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    p = params.float()
    return q.float().mul_(p[..., 1:2]).add_(p[..., 0:1])


def encode4(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """4-bit levels and [min, step] of ``x`` over groups of its last axis (the last group
    padded with its last value, so that its range is its own)."""
    import torch

    q, params = levels4(grouped(x, group))
    return torch.cat([pack4(q), params.reshape(-1).view(torch.uint8)])


def decode4(stored: torch.Tensor, shape: tuple[int, ...], group: int = GROUP) -> torch.Tensor:
    """The values of ``shape`` :func:`encode4` stored, grouped along the last axis."""
    import torch

    size, groups = groups_of(shape[-1], group)
    grouped = (*shape[:-1], groups, size)
    half = math.prod(grouped) // 2
    q = unpack4(stored[:half], grouped)
    params = stored[half:].view(torch.bfloat16).view(*grouped[:-1], 2)
    return values4(q, params).reshape(*shape[:-1], groups * size)[..., : shape[-1]]
