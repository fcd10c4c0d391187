"""KV samples for the kernels' tests: random heads of varied scale, an outlier channel."""

from __future__ import annotations

import torch


def sample_kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g) * torch.rand((*shape[:-1], 1), generator=g) * 10
    kv[..., 3] *= 30  # an outlier channel, as keys have
    return kv.to(dtype)
