"""kvtier.policy.scheduling without vLLM: the step model's fit, and how many of the requests
about to answer the next step takes (checked against every split, tried one by one)."""

from __future__ import annotations

import itertools
import random

import pytest

from kvtier.policy.scheduling import MAX_SPLIT, StepModel, first_answers


def model(fixed: float, per_token: float, per_start: float = 0.0) -> StepModel:
    m = StepModel()
    m.fixed_s, m.per_token_s, m.per_start_s = fixed, per_token, per_start
    return m


def waits(
    split: list[int], works: list[int], m: StepModel, behind: list[int], decodes: int
) -> float:
    """The sum of the waits of the requests about to answer and of those behind them,
    served in the steps ``split`` gives (sizes, in order)."""
    now, total, i = 0.0, 0.0, 0
    for size in split:
        now += m.seconds(sum(works[i : i + size]) + decodes, size)
        total += now * size
        i += size
    return total + now * len(behind)


def every_split(n: int) -> list[list[int]]:
    out = []
    for cuts in itertools.product((False, True), repeat=n - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        out.append([*sizes, size])
    return out


def test_the_first_step_is_that_of_the_best_split_of_all() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 7)
        works = [rng.randint(1, 400) for _ in range(n)]
        m = model(rng.uniform(0.0, 0.3), rng.uniform(1e-4, 4e-3), rng.uniform(0.0, 0.1))
        behind = [rng.randint(100, 3000) for _ in range(rng.randint(0, 3))]
        decodes = rng.randint(0, 8)
        best = min(every_split(n), key=lambda s: waits(s, works, m, behind, decodes))
        got = first_answers(works, m, behind, decodes)
        cost = waits(best, works, m, behind, decodes)
        # the first step of some best split (ties aside)
        assert any(
            s[0] == got and waits(s, works, m, behind, decodes) <= cost + 1e-12
            for s in every_split(n)
        ), (works, got, best)


def test_what_the_split_is_on_cpu_and_gpu_like_steps() -> None:
    hits, cold = [30, 30, 30], [2030]
    # Measured through kvtier serve (Xeon, 2 cores, bf16): a 57 ms, b 0.33 ms, c 22 ms.
    assert first_answers(hits, model(0.057, 0.00033, 0.022), cold) == 3
    # With a hit's own cost near the fixed one, two first, then one.
    assert first_answers(hits, model(0.057, 0.00033, 0.06), cold) == 2
    # A fixed cost small beside a hit's own: one at a time.
    assert first_answers(hits, model(0.002, 0.0004, 0.05), cold) == 1
    # A fixed cost that dwarfs the hits': all in one step.
    assert first_answers(hits, model(0.5, 0.0004, 0.0), cold) == 3
    assert first_answers([], model(0.06, 0.0004)) == 0
    assert first_answers([40], model(0.06, 0.0004)) == 1
    assert first_answers([10] * (MAX_SPLIT + 20), model(5.0, 1e-4)) == MAX_SPLIT


def test_the_step_model_tells_a_hits_start_from_its_tokens() -> None:
    rng = random.Random(3)
    m = StepModel()
    for _ in range(200):
        starts = rng.randint(0, 3)
        tokens = rng.choice([4, 64, 2048]) + 150 * starts
        m.observe(tokens, 0.06 + 0.0004 * tokens + 0.05 * starts + rng.gauss(0, 0.002), starts)
    assert m.fixed_s == pytest.approx(0.06, abs=0.01)
    assert m.per_token_s == pytest.approx(0.0004, rel=0.05)
    assert m.per_start_s == pytest.approx(0.05, abs=0.01)


def test_the_step_model_fits_two_parts_when_no_step_begins_a_prefill() -> None:
    m = StepModel()
    for tokens in (64, 2048, 4, 4, 2048, 300):
        m.observe(tokens, 0.05 + 0.003 * tokens)
    assert (m.fixed_s, m.per_token_s, m.per_start_s) == pytest.approx((0.05, 0.003, 0.0))
    one = StepModel()
    one.observe(100, 0.4)  # one size: a rate, no fixed part
    assert (one.fixed_s, one.per_token_s) == pytest.approx((0.0, 0.004))
