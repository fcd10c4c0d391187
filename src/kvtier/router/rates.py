"""An engine's prefill rate as the router prices it (:meth:`EngineSet.prefill_rate`).

Each engine's samples are (prompt tokens computed, seconds to the first token) of requests
that found it idle. Two requests of the same length on the same engine take 0.36 to 0.60 s on
a 2-core host: with a few samples each, one of two equal engines would look faster, win every
cold prompt, and never be sampled again (a CI run sent four cold users in a row to one of
two engines that way). So an engine is priced at the pod's rate, moved toward its own only
by as much as its own differs beyond its noise (twice its standard error): a steady
difference still shows, once its samples are many enough to tell it from the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvtier.policy.routing import DEFAULT_PREFILL_TOKENS_PER_S

Samples = Sequence[tuple[int, float]]  # (tokens, seconds)

SAMPLE_NOISE = 0.25  # one sample's rate vs its engine's, until samples measure it ...
NOISE_PRIOR = 8  # ... worth this many samples


def rate_of(samples: Samples) -> float:
    """Tokens per second over ``samples`` (the default before any)."""
    seconds = sum(s for _, s in samples)
    return sum(t for t, _ in samples) / seconds if seconds > 0 else DEFAULT_PREFILL_TOKENS_PER_S


class PrefillRates:
    """The pod's rate and its sample noise, kept until a new sample changes them (they are
    asked for per engine per request: over every sample each time, O(N^2) a request)."""

    def __init__(self) -> None:
        self._pod: tuple[int, float, float] | None = None  # (version, rate, noise)

    def of(self, own: Samples, pod: Sequence[Samples], version: int) -> float:
        """The rate to price an engine at: ``own`` its samples, ``pod`` every engine's that
        has any, ``version`` a count that grows with every sample taken."""
        measured = [s for s in pod if s]
        if not measured:
            return DEFAULT_PREFILL_TOKENS_PER_S
        if self._pod is None or self._pod[0] != version:
            whole = [x for s in measured for x in s]
            self._pod = (version, rate_of(whole), _noise(measured))
        _, rate, noise = self._pod
        if not own:
            return rate
        off = math.log(rate_of(own) / rate)
        beyond = max(0.0, abs(off) - 2 * noise / math.sqrt(len(own)))
        return rate * math.exp(math.copysign(beyond, off))


def _noise(measured: Sequence[Samples]) -> float:
    """How far one sample's rate strays from its engine's, as a fraction: the spread of the
    samples about their engines' rates, pulled toward :data:`SAMPLE_NOISE` while they are few
    (a few samples can sit close together by chance)."""
    spread, count = NOISE_PRIOR * SAMPLE_NOISE**2, NOISE_PRIOR
    for samples in measured:
        own = rate_of(samples)
        spread += sum(math.log(t / s / own) ** 2 for t, s in samples)
        count += len(samples) - 1
    return math.sqrt(spread / count)
