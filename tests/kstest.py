"""The two-sample Kolmogorov-Smirnov test (no SciPy here): the statistic and its asymptotic
p-value, as Gu et al. ("Auditing Prompt Caching", ICML'25) use it on TTFT samples."""

from __future__ import annotations

import math
from collections.abc import Sequence


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest distance between the two samples' empirical distribution functions."""
    xs, ys = sorted(a), sorted(b)
    i = j = 0
    distance = 0.0
    while i < len(xs) and j < len(ys):
        value = min(xs[i], ys[j])
        while i < len(xs) and xs[i] == value:
            i += 1
        while j < len(ys) and ys[j] == value:
            j += 1
        distance = max(distance, abs(i / len(xs) - j / len(ys)))
    return distance


def ks_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """P(a distance this large | both samples from one distribution), from the Kolmogorov
    distribution with Stephens' small-sample correction."""
    n = len(a) * len(b) / (len(a) + len(b))
    root = math.sqrt(n)
    lam = (root + 0.12 + 0.11 / root) * ks_statistic(a, b)
    if lam < 0.2:
        return 1.0
    total = sum((1.0 if k % 2 else -1.0) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))
