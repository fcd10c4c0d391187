"""Hits first: the order an engine serves requests in, and how many tokens one step computes.

A request whose context is cached has little left to compute; one that is cold has its whole
prompt. Served in arrival order, a hit that arrives with a cold prompt waits for the cold
prompt's prefill step (seconds on a CPU), so the cache saves it nothing. Two rules fix that:

- **Short steps when someone may be waiting.** Right after a request arrives (or while one
  ranks ahead of a prefill under way), an engine step computes at most the tokens that fit in
  ``step_s`` seconds, as the engine measures itself (:class:`StepModel`: a step takes
  ``a + b x tokens``), so that the companions of a burst's first request, which arrive
  milliseconds after it, wait little for the step under way. Each step after that with no
  new arrival may last twice as long as the one before, up to ``max_step_s``: short steps
  cost a cold prompt their fixed part ``a`` each, and on a CPU more (chunked prefill's
  attention reads the whole prefix again each step), a price worth paying only while a
  step holds someone up. A request that arrives during a long step waits at most
  ``max_step_s`` for it.
- **Least work first, with aging.** A request's priority is its arrival time plus ``patience``
  times its expected prefill time (:func:`priority_ms`; smaller runs first). In a burst the
  request with the least to compute goes first; a cold request is overtaken only by requests
  that arrive within ``patience`` times its own prefill time after it, so its wait is bounded:
  it never starves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

STEP_S = 0.5  # the step target right after an arrival: a burst's hits wait about this
MAX_STEP_S_FACTOR = 4  # with no arrival, steps grow up to 4 x step_s (a late hit's worst wait)
PATIENCE = 2.0  # a cold request yields to what arrives within 2x its own prefill time after it
GATHER_S = 0.05  # an idle engine's wait for the companions of what arrived, at most
GATHER_SHARE = 0.05  # ...and at most this share of the shortest waiting request's step
MIN_STEP_TOKENS = 64  # below this a step's fixed cost dominates and prefill crawls
MAX_SPLIT = 64  # requests about to answer that first_answers splits into steps, at most


@dataclass(frozen=True)
class SchedulingOptions:
    """The scheduler's options (``kv_connector_extra_config["scheduling"]``).

    Attributes:
        hits_first: order requests by :func:`priority_ms` and keep steps short; False keeps
            vLLM's own scheduling.
        step_s: the target duration of an engine step right after a request arrives, in
            seconds.
        max_step_s: the longest a step may grow to while no request arrives (default: 4 x
            ``step_s``); ``step_s`` itself keeps every step short.
        gather_s: how long an idle engine waits, at most, after a request arrives before its
            first step, for requests sent with it (a burst) to be ranked with it; never more
            than 5% of the step the shortest of them needs. 0: no wait.
        patience: how long a request lets later, smaller ones go first, in multiples of its
            own expected prefill time.
    """

    hits_first: bool = True
    step_s: float = STEP_S
    max_step_s: float | None = None
    patience: float = PATIENCE
    gather_s: float = GATHER_S

    def __post_init__(self) -> None:
        if not (isinstance(self.step_s, int | float) and 0.01 <= self.step_s <= 60):
            raise ValueError(f"step_s: expected seconds between 0.01 and 60, got {self.step_s!r}")
        if self.max_step_s is not None and not (
            isinstance(self.max_step_s, int | float) and self.step_s <= self.max_step_s <= 600
        ):
            raise ValueError(
                f"max_step_s: expected seconds from step_s ({self.step_s}) to 600,"
                f" got {self.max_step_s!r}"
            )
        if not (isinstance(self.gather_s, int | float) and 0 <= self.gather_s <= 5):
            raise ValueError(f"gather_s: expected seconds from 0 to 5, got {self.gather_s!r}")
        if not (isinstance(self.patience, int | float) and 0 <= self.patience <= 1000):
            raise ValueError(f"patience: expected 0 to 1000, got {self.patience!r}")

    def step_seconds(self, calm_steps: int) -> float:
        """How long the next step may last after ``calm_steps`` steps with no arrival (and
        nobody waiting ahead of a prefill under way): ``step_s``, doubling each calm step up
        to ``max_step_s``."""
        longest = (
            self.max_step_s if self.max_step_s is not None else MAX_STEP_S_FACTOR * self.step_s
        )
        return float(min(longest, self.step_s * 2.0 ** min(calm_steps, 30)))


class StepModel:
    """An engine step's duration as ``a + b x tokens + c x starts``, fitted to the steps the
    engine ran: ``starts`` are the requests whose prefill begins in the step. A hit's first
    step costs more than its few tokens at the rate of a cold prompt's: its KV is loaded, and
    its tokens attend to the whole cached context (docs/scheduling.md: ~42 ms per hit
    besides its tokens, on a 2-core Xeon in bf16).

    A weighted least-squares fit that forgets old steps (``memory`` steps' half-life), so it
    follows a host whose speed changes. Until the steps tell the three parts apart it fits
    ``a + b x tokens`` (``c`` = 0), and until it has seen steps of two different sizes it
    uses ``tokens_per_s`` and no fixed cost.
    """

    def __init__(self, tokens_per_s: float = 300.0, memory: int = 64):
        self._decay = 0.5 ** (1 / memory)
        self._m = [[0.0] * 4 for _ in range(4)]  # decayed moments of (1, tokens, starts, s)
        self.fixed_s = 0.0
        self.per_token_s = 1 / tokens_per_s
        self.per_start_s = 0.0

    def observe(self, tokens: int, seconds: float, starts: int = 0) -> None:
        """One step that computed ``tokens`` tokens in ``seconds``, beginning the prefill of
        ``starts`` requests."""
        if tokens <= 0 or not (0 < seconds < 600):
            return
        x = (1.0, float(tokens), float(max(0, starts)), seconds)
        for i in range(4):
            for j in range(4):
                self._m[i][j] = self._m[i][j] * self._decay + x[i] * x[j]
        full = _solve(self._m, (0, 1, 2))
        if full is not None and full[0] >= 0 and full[1] > 0 and full[2] >= 0:
            self.fixed_s, self.per_token_s, self.per_start_s = full
            return
        two = _solve(self._m, (0, 1))
        if two is not None and two[1] > 0:
            self.fixed_s, self.per_token_s, self.per_start_s = max(0.0, two[0]), two[1], 0.0
            return
        # one size only: a rate
        self.per_token_s, self.fixed_s, self.per_start_s = self._m[1][3] / self._m[1][1], 0.0, 0.0

    def seconds(self, tokens: int, starts: int = 0) -> float:
        """The expected duration of a step of ``tokens`` tokens that begins ``starts``
        requests' prefills."""
        return self.fixed_s + self.per_token_s * tokens + self.per_start_s * starts

    def tokens_within(self, seconds: float) -> int:
        """The most tokens a step may compute to last about ``seconds``."""
        return max(MIN_STEP_TOKENS, math.floor((seconds - self.fixed_s) / self.per_token_s))


def _solve(m: list[list[float]], cols: tuple[int, ...]) -> list[float] | None:
    """The least-squares coefficients of ``cols`` (of the moments ``m``, whose last column is
    the target), or None when those columns do not tell the coefficients apart."""
    n = len(cols)
    a = [[m[i][j] for j in cols] + [m[i][3]] for i in cols]
    scale = max(abs(a[i][i]) for i in range(n)) or 1.0
    for k in range(n):  # Gaussian elimination with partial pivoting
        p = max(range(k, n), key=lambda r: abs(a[r][k]))
        if abs(a[p][k]) <= 1e-9 * scale:
            return None
        a[k], a[p] = a[p], a[k]
        for r in range(k + 1, n):
            f = a[r][k] / a[k][k]
            for c in range(k, n + 1):
                a[r][c] -= f * a[k][c]
    out = [0.0] * n
    for k in range(n - 1, -1, -1):
        out[k] = (a[k][n] - sum(a[k][c] * out[c] for c in range(k + 1, n))) / a[k][k]
    return out


def first_answers(
    works: Sequence[int], model: StepModel, behind: Sequence[int] = (), decodes: int = 0
) -> int:
    """How many of the requests about to answer the next step takes, the others going in
    later steps: ``works`` are their prefill tokens in the order they are served, ``behind``
    those of the requests waiting behind them (each waits for every one of these steps),
    ``decodes`` the tokens every step adds for requests decoding.

    A step of ``n`` tokens lasts ``model.seconds(n, starts)``: the requests in one step all
    answer at its end, so k hits of ``w`` tokens in one step cost each ``a + k (b w + c)``,
    one per step the i-th ``i (a + b w + c)``. Neither is best in general: when the fixed
    part ``a`` is small beside a hit's own cost, one per step; when it dwarfs it, all in one.
    The split into consecutive steps is the one that makes the sum of everyone's wait for
    these steps least, theirs and that of the requests behind them (each waits for every
    one of these steps): the mean time to first token of all of them. (Weighing each wait
    by the request's own time alone, its slowdown, put a burst's third hit in a step of
    its own on a 2-core Xeon: the cold prompt behind waited ~90 ms more for ~40 ms saved
    on two hits.) Found exactly: dynamic programming over the cut points, the classic
    batching of a serial machine with a set-up time per batch."""
    n = min(len(works), MAX_SPLIT)
    if n <= 1:
        return n

    waiting = len(behind)
    best = [0.0] * (n + 1)  # best[i]: the least cost of requests i.. given that i starts next
    cut = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        tokens, best[i] = 0, math.inf
        for j in range(i + 1, n + 1):
            tokens += max(0, works[j - 1])
            # every request from i on, and every one behind, waits for this step
            cost = (n - i + waiting) * model.seconds(tokens + decodes, j - i) + best[j]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    return cut[0]


def priority_ms(arrival_s: float, work_tokens: int, model: StepModel, patience: float) -> int:
    """A request's priority, smaller first: its arrival plus ``patience`` times the time its
    prefill takes, in milliseconds since the scheduler's start (``arrival_s`` counts from it).

    Two requests arriving together go in the order of their work; a request yields to one
    arriving ``dt`` later only when the other's extra patience is worth more than ``dt``, so a
    cold request waits for at most what arrives within ``patience x its prefill`` after it.
    """
    return round(1000 * (arrival_s + patience * model.per_token_s * max(0, work_tokens)))
