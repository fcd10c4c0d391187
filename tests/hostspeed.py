"""How fast this host prefills, for tests that size prompts and time-outs by it.

Hosts differ by 10x and more: an AVX-512 BF16 CPU prefills the demo model at ~1,000 tokens/s
on two cores in bf16, an AVX2-only EPYC at ~130-300 in fp32 (the dtype kvtier picks there).
A prompt that keeps an engine busy for one second on the first keeps it busy for ten on the
second; a test that needs a request in flight, or a stream of turns, sizes its prompts with
:func:`words_for` and its waits with :func:`patience`.
"""

from __future__ import annotations

import functools

from kvtier.integrations.engine_dtype import choose_dtype, matmul_gflops
from kvtier.integrations.engine_layout import has_gpu

FLOP_PER_TOKEN = 2 * 135e6  # SmolLM2-135M's forward pass, per token (attention aside)
# The share of one linear layer's rate a whole engine step reaches, per core: measured on an
# AVX2-only EPYC, 27.7 GFLOP/s fp32 on one thread and 66 prompt tokens/s per core (0.64).
EFFICIENCY = 0.6
TOKENS_PER_WORD = 6.5  # "tag item123": what pods.text() makes, in SmolLM2's tokens
REFERENCE_RATE = 500.0  # tokens/s per core on the host the suite's time-outs were set on


@functools.cache
def engine_dtype() -> str:
    """The dtype kvtier serve and kvtier pod pick here (the same measurement)."""
    dtype: str = choose_dtype(has_gpu()).dtype
    return dtype


@functools.cache
def tokens_per_s(dtype: str | None = None, cores: int = 1) -> float:
    """Prompt tokens per second an engine on ``cores`` cores computes here, estimated."""
    rate: float = matmul_gflops(dtype or engine_dtype()) * 1e9 / FLOP_PER_TOKEN * EFFICIENCY
    return rate * cores


def words_for(seconds: float, low: int, high: int, dtype: str | None = None) -> int:
    """Words of :func:`pods.text` that take about ``seconds`` of one core to prefill, within
    [``low``, ``high``] (what the test needs at least, and what keeps it short)."""
    words = int(seconds * tokens_per_s(dtype) / TOKENS_PER_WORD)
    return max(low, min(high, words))


def patience(seconds: float, dtype: str | None = None) -> float:
    """``seconds`` of a wait set on a fast host, stretched for a slower one (never shrunk)."""
    return seconds * max(1.0, REFERENCE_RATE / tokens_per_s(dtype))
