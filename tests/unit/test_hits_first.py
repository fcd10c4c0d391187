"""The hits-first scheduler, driven as vLLM's engine core drives it, with no model: vLLM's own
Scheduler and KV cache manager (prefix caching on) in this process, steps timed by a simulated
clock (a step of n tokens lasts FIXED_S + n x PER_TOKEN_S, about this host's fp32 speed), and
each step's sampled token made up. The same arrivals run through vLLM's own FCFS scheduler
and through kvtier's, side by side: hits go first in a burst, steps stay short while requests
share the engine, a lone request keeps the whole budget, a cold request waits a bounded time
under a flood of hits, and a hit whose background load ends is served ahead of cold prefills
queued before it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from vllm.v1.request import RequestStatus

from kvtier.integrations.model import prepare_default_model

from kvhelpers import chunk
from schedsim import BUDGET, FIXED_S, PER_TOKEN_S, STEP_S, Engine, scheduler, tokens


@pytest.fixture(scope="module")
def model() -> str:
    return str(prepare_default_model())


def burst(engine: Engine, users: int = 3, cold: bool = True) -> tuple[str, list[str]]:
    """Users with a 1,500-token history each, then a burst: a cold 2,000-token first turn
    arrives first, then each user's next turn (the history and 40 new tokens)."""
    histories = [tokens(u, 1500) for u in range(users)]
    for h in histories:
        engine.add(h)
    engine.run()
    first = engine.add(tokens(99, 2000)) if cold else ""
    hits = [engine.add(h + tokens(50 + u, 40)) for u, h in enumerate(histories)]
    engine.run()
    return first, hits


def test_a_burst_serves_the_hits_first_and_the_cold_prompt_barely_later(model: str) -> None:
    alone = Engine(scheduler(model, hits_first=False))
    fcfs = Engine(scheduler(model, hits_first=False))
    ours = Engine(scheduler(model, hits_first=True))
    _, hits_a = burst(alone, cold=False)
    cold_f, hits_f = burst(fcfs)
    cold_o, hits_o = burst(ours)
    isolated = max(alone.ttft(h) for h in hits_a)  # the three hits, no cold prompt
    # FCFS: the hits wait for the cold prompt's first step (2,048 tokens, ~6 s).
    assert min(fcfs.ttft(h) for h in hits_f) > 2000 * PER_TOKEN_S
    # Hits first: as fast as without the cold prompt (the median), at most twice as slow
    # (the last, which the step budget leaves to the next step), 1/5 of FCFS's at most.
    got = sorted(ours.ttft(h) for h in hits_o)
    assert got[1] <= 1.25 * isolated and got[-1] <= 2 * isolated
    assert got[-1] * 5 < min(fcfs.ttft(h) for h in hits_f)
    # The cold prompt: at most 25% later than under FCFS.
    assert ours.ttft(cold_o) <= 1.25 * fcfs.ttft(cold_f)


def test_steps_are_short_after_an_arrival_and_grow_while_none_comes(model: str) -> None:
    fcfs = Engine(scheduler(model, hits_first=False))
    engine = Engine(scheduler(model, hits_first=True))
    for e in (fcfs, engine):
        e.add(tokens(1, 3000))
        e.run()
    assert fcfs.steps[0][0] == BUDGET  # vLLM's own: 2,048 tokens (~6 s) a step
    fit = engine.sched.model  # type: ignore[attr-defined]
    assert fit.per_token_s == pytest.approx(PER_TOKEN_S) and fit.fixed_s == pytest.approx(FIXED_S)
    longest = int((4 * STEP_S - FIXED_S) / PER_TOKEN_S)  # max_step_s: 4 x step_s
    # Alone, each step twice the one before (the first sized by the default speed, 300
    # tokens/s and no fixed cost, until the engine has measured its own), up to 2 s.
    sizes = [t for t, _ in engine.steps if t > 1]
    assert sizes[:2] == [150, 300] and sizes[2] >= longest - 1 and max(sizes) <= longest + 1
    # Before its first step the idle engine waited 50 ms (GATHER_S) for companions; none came.
    empty = next(i for i, (t, _) in enumerate(engine.steps) if t)
    assert 0.05 <= empty * 0.01 <= 0.06
    # What it costs a cold prompt: that, and the fixed cost of the extra steps: a few percent.
    extra = (len([t for t, _ in engine.steps if t]) - len(fcfs.steps)) * FIXED_S
    assert engine.ttft("r0") == pytest.approx(fcfs.ttft("r0") + extra + empty * 0.01, abs=0.01)
    assert engine.ttft("r0") <= 1.1 * fcfs.ttft("r0")
    # Two arrive: the first steps after the arrival fit STEP_S (now that the engine knows
    # its speed), then they grow again.
    engine.steps.clear()
    a, b = engine.add(tokens(2, 3000)), engine.add(tokens(3, 3000))
    engine.run()
    engine.steps[:] = [s for s in engine.steps if s[0]]  # less the wait for companions
    short = int((STEP_S - FIXED_S) / PER_TOKEN_S)
    twice = int((2 * STEP_S - FIXED_S) / PER_TOKEN_S)
    assert engine.steps[0][0] <= short + 1 and engine.steps[1][0] <= twice + 2
    assert max(t for t, _ in engine.steps) <= longest + 2  # +1 token per decode
    assert engine.ttft(a) < engine.ttft(b)  # the same work: in arrival order
    # A request arriving while a long step runs resets the steps to short ones.
    engine.add(tokens(4, 3000))
    while engine.steps[-1][0] < 2 * short:
        engine.step()
    engine.steps.clear()
    engine.add(tokens(5, 40))
    engine.step()
    assert engine.steps[0][0] <= short + 2


def test_hits_whose_prefills_outlast_a_step_go_in_turn_before_the_cold_prompt(
    model: str,
) -> None:
    """Three hits (1,536 tokens in kvtier, ~200 to compute) arrive while a cold prompt runs,
    with steps of ~66 tokens: each needs several steps. The first takes the steps while the
    others wait; they must still go before the cold prompt (a hit that found no tokens left in
    a step is not one that found no room)."""
    extra = {"chunk_tokens": 256, "loads": "sync", "tiers": [MEMORY_TIER]}
    engine = Engine(scheduler(model, hits_first=True, extra=extra))
    sched: Any = engine.sched
    sched.options = replace(sched.options, step_s=0.25, max_step_s=2.0)
    history = tokens(51, 1536)
    put_chunks(engine, history)
    cold = engine.add(tokens(52, 3000))
    engine.start(cold, steps=2)
    hits = [engine.add(history + tokens(53 + i, 200)) for i in range(3)]
    engine.run()
    waits = sorted(engine.ttft(h) for h in hits)
    assert waits[-1] < 3.0, waits  # ~10 steps of ~0.25 s, not the cold prompt's ~10 s
    assert waits[-1] * 3 < engine.ttft(cold)


def test_an_idle_engine_waits_a_moment_for_a_cold_prompts_companions(model: str) -> None:
    """A burst's requests reach the engine milliseconds apart. A cold prompt that arrives
    alone waits up to 50 ms (GATHER_S) before its first step; a hit 20 ms behind it then goes
    first. Without that wait the hit waits for the cold prompt's first step."""
    results = {}
    for gather in (0.0, 0.05):
        engine = Engine(scheduler(model, hits_first=True))
        sched: Any = engine.sched
        sched.options = replace(sched.options, gather_s=gather)
        history = tokens(61, 1500)
        engine.add(history)
        engine.run()
        cold = engine.add(tokens(62, 2000))
        # The hit arrives 20 ms later: two empty steps of 10 ms while the engine waits, or
        # during the cold prompt's first step (the simulated clock lets it in after).
        for _ in range(2 if gather else 1):
            engine.step()
        hit = engine.add(history + tokens(63, 40))
        engine.run()
        t0 = engine.arrived[cold]
        results[gather] = (engine.first_token[hit] - t0, engine.ttft(cold))
    (hit_now, cold_now), (hit_gathered, cold_gathered) = results[0.0], results[0.05]
    assert hit_gathered < 0.3 < STEP_S < hit_now  # it waited for the cold prompt's first step
    assert cold_gathered < cold_now + 0.1  # what the cold prompt lost: the wait, and a step


def flood(engine: Engine, until: float) -> str:
    """A cold 2,000-token prompt, then a user's hits of ~160 tokens of work each, one every
    0.4 s: more than the engine can serve (one takes ~0.53 s). The cold prompt's id."""
    history = tokens(5, 1200)
    engine.add(history)
    engine.run()
    cold = engine.add(tokens(6, 2000))
    start, sent = engine.now, 0
    while cold not in engine.first_token and engine.now < start + until:
        while start + 0.4 * sent <= engine.now:
            engine.add(history + tokens(100 + sent, 160))
            sent += 1
        engine.step()
    return cold


def test_a_cold_request_under_a_flood_of_hits_waits_a_bounded_time(model: str) -> None:
    engine = Engine(scheduler(model, hits_first=True))
    cold = flood(engine, until=120)
    alone_s = FIXED_S + 2000 * PER_TOKEN_S
    waited = engine.ttft(cold)
    # It yielded to the hits (served first, it would have answered in alone_s)...
    assert waited > 2 * alone_s
    # ...but only to those that arrived within its patience (2x its prefill, 12 s): their
    # work (~0.53 s each, 30 of them) and its own in short steps, with room to spare.
    patience_s = 2 * alone_s
    assert waited <= patience_s + patience_s / 0.4 * 0.53 + 1.5 * alone_s
    # Without aging (least work first alone) the same cold prompt starves.
    greedy = Engine(scheduler(model, hits_first=True))
    greedy.sched.options = replace(greedy.sched.options, patience=1000)  # type: ignore[attr-defined]
    starved = flood(greedy, until=60)
    assert starved not in greedy.first_token


def test_a_hit_that_finds_no_free_blocks_does_not_stall_the_prefill_holding_them(
    model: str,
) -> None:
    """vLLM's cache holds 2,400 tokens: a cold 2,000-token prompt 1,800 tokens in holds most
    of it when a user's hit arrives, its 1,536-token history in kvtier (not in vLLM's cache):
    it ranks first, but cannot get blocks to load into until the cold prompt is done, so the
    cold prompt must go on rather than sit out every step for it."""
    extra = {"chunk_tokens": 256, "loads": "sync", "tiers": [MEMORY_TIER]}
    engine = Engine(scheduler(model, hits_first=True, extra=extra, num_blocks=150))
    sched: Any = engine.sched
    sched.options = replace(sched.options, max_step_s=STEP_S)  # steps of 0.5 s: ~14 to go
    history = tokens(31, 1536)  # seeds no other test uses: kvtier's store is the process's
    put_chunks(engine, history)
    cold = engine.add(tokens(32, 2000))
    while engine.sched.requests[cold].num_computed_tokens < 1800:
        engine.step()
    hit = engine.add(history + tokens(33, 40))
    assert engine.sched.requests[hit].priority < engine.sched.requests[cold].priority
    engine.run(until=engine.now + 60)
    assert cold in engine.first_token and hit in engine.first_token
    assert engine.first_token[cold] < engine.first_token[hit]  # it had to wait for the blocks
    assert engine.ttft(cold) < 10  # ~14 steps of 0.5 s: it lost no more than a step or two


MEMORY_TIER = {"kind": "memory", "capacity": "64MiB", "prefault": False}


def put_chunks(engine: Engine, prompt: list[int]) -> None:
    """kvtier holds ``prompt``'s whole chunks (random bytes: no model reads them here)."""
    side = engine.sched.connector.scheduler  # type: ignore[union-attr]
    store, ns = side.ctx.store, side.ctx.namespace(None)
    n = len(prompt) // 256
    store.put(prompt[: n * 256], ns, [chunk(i, (2, 2, 256, 2, 8)) for i in range(n)])
    store.flush()


def test_a_hit_whose_background_load_ends_goes_before_cold_prefills(
    model: str, tmp_path: Path
) -> None:
    extra = {"chunk_tokens": 256, "loads": "async", "tiers": [MEMORY_TIER]}  # all background
    fcfs = Engine(scheduler(model, hits_first=False, extra=extra))
    ours = Engine(scheduler(model, hits_first=True, extra=extra))
    results = []
    for engine in (fcfs, ours):
        held = tokens(7, 1024)  # four chunks kvtier holds
        put_chunks(engine, held)
        colds = [engine.add(tokens(10 + i, 3000)) for i in range(2)]
        engine.start(colds[0])  # the cold prompts are under way
        hit = engine.add(held + tokens(8, 30))
        waiting = RequestStatus.WAITING_FOR_REMOTE_KVS
        for _ in range(20):  # until vLLM looks it up (the first step it ranks first)
            if engine.sched.requests[hit].status == waiting:
                break
            engine.step()
        assert engine.sched.requests[hit].status == waiting
        engine.loaded.add(hit)  # the worker reports it loaded with the next step
        engine.step()
        engine.run()
        results.append((engine.ttft(hit), max(engine.ttft(c) for c in colds)))
    (hit_f, cold_f), (hit_o, cold_o) = results
    assert hit_o < STEP_S * 3 < hit_f  # FCFS: behind the cold prefills' steps
    assert cold_o <= 1.25 * cold_f


def test_an_idle_engine_waits_a_moment_for_a_hits_companions(model: str) -> None:
    """Two hits of a burst reach an idle engine 10 ms apart (no count of the requests on
    their way: the engine waits 5% of the first hit's step): with the gather they share the
    first step (its fixed cost, 0.3 s here, outweighs a hit's own tokens); without it the
    second waits for the first one's step."""
    answered = {}
    for gather in (0.0, 0.05):
        engine = Engine(scheduler(model, hits_first=True), fixed_s=0.3)
        sched: Any = engine.sched
        sched.options = replace(sched.options, gather_s=gather)
        history = tokens(71, 1500)
        engine.add(history)
        engine.run()
        first = engine.add(history + tokens(72, 40))
        engine.step()  # 10 ms: an empty step while the engine waits, or the first hit's step
        second = engine.add(history + tokens(73, 40))
        engine.run()
        answered[gather] = (engine.first_token[first], engine.first_token[second])
    (a_now, b_now), (a_gathered, b_gathered) = answered[0.0], answered[0.05]
    assert b_now > a_now  # a step of its own, after the first hit's
    assert b_gathered == a_gathered  # one step for both
    # What the first hit paid: the wait (5% of its step) and the second hit's tokens.
    assert a_gathered - a_now < 0.3, answered
