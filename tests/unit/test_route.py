"""The router's routing (kvtier.router.route) with an index built by hand, and the queue
accounting each route owns: a burst of one prompt, a retry on another engine, an engine that
dies mid-request, a prefill engine, a prompt that turns out longer than routed on."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from typing import Any

import pytest

from kvtier.integrations.model import prepare_default_model
from kvtier.keys import Namespace, chunk_keys
from kvtier.router.engines import Engine, EngineSet
from kvtier.router.index import ChunkIndex
from kvtier.router.prompts import Prompter
from kvtier.router.route import Route, Routing

CHUNK, BLOCK = 256, 16
NAMESPACE = {"model": "demo", "model_revision": "r1", "kv_dtype": "float32"}
INFO = {
    "chunk_tokens": CHUNK,
    "block_size": BLOCK,
    "namespace": NAMESPACE,
    "bytes_per_token": 23_040,
}
PATH = "/v1/completions"


@pytest.fixture(scope="module")
def prompter() -> Prompter:
    return Prompter(prepare_default_model())


def routing(prompter: Prompter, urls: list[str], prefill: list[str] | None = None) -> Routing:
    index = ChunkIndex()
    engines = EngineSet(urls, index, prefill)
    for engine in engines.engines:  # as their health checks and feeds would have them
        engine.healthy, engine.info = True, dict(INFO)
    return Routing(engines, index, prompter)


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104_729) % 40_000 + 100 for i in range(n)]


def hexes(ids: list[int], salt: str | None = None) -> list[str]:
    namespace = Namespace(**NAMESPACE, tenant_salt=salt)
    return [k.hex() for k in chunk_keys(ids, namespace, CHUNK)]


def route(r: Routing, body: dict[str, Any]) -> tuple[list[Engine], Route | None]:
    return asyncio.run(r.route(PATH, body))


def test_a_prompt_goes_where_its_chunks_are_and_a_cold_one_by_queues(prompter: Prompter) -> None:
    r = routing(prompter, ["http://a", "http://b"])
    a, b = r.engines.engines
    held = tokens(1, 5 * CHUNK + 37)
    r.index.replace(b.url, {"dram": hexes(held)})
    order, got = route(r, {"prompt": held, "max_tokens": 1})
    assert got is not None and got.engine is b and order == [b, a]
    assert got.queued == 37  # five chunks load, the rest is computed
    assert got.decision is not None and got.decision.predicted == 5 * CHUNK
    # Another tenant's request for the same tokens holds nothing there.
    _, salted = route(r, {"prompt": held, "max_tokens": 1, "cache_salt": "t2"})
    assert salted is not None and salted.queued == len(held)
    # A cold prompt goes to the engine with the shorter queue.
    with got.in_queue():
        _, cold = route(r, {"prompt": tokens(2, 1000), "max_tokens": 1})
    assert cold is not None and cold.engine is a and cold.queued == 1000


def test_a_burst_of_one_prompt_counts_each_request_once(prompter: Prompter) -> None:
    r = routing(prompter, ["http://a", "http://b"])
    a, b = r.engines.engines
    burst = tokens(3, 3 * CHUNK + 10)
    routes = []
    queues = ExitStack()
    for _ in range(4):  # all four arrive before any first token
        _, got = route(r, {"prompt": burst, "stream": True})
        assert got is not None
        routes.append(got)
        queues.enter_context(got.in_queue())
    # The first is cold. The second would wait behind the first's prefill to reuse it: it
    # computes the prompt on the other engine instead. The index predicts the chunks of both
    # where they went, so the rest reuse them and each adds only what it computes there.
    first, second = routes[0].engine, routes[1].engine
    assert first is not second
    assert [x.decision.reason for x in routes if x.decision] == ["cold", "load"] + [
        "engine hit"
    ] * 2
    assert [x.queued for x in routes] == [len(burst), len(burst), 10, 10]
    assert a.queued_tokens + b.queued_tokens == 2 * len(burst) + 20
    # Per request too (what a hits-first engine's wait is priced from).
    assert sorted([*a.queued_work.elements(), *b.queued_work.elements()]) == sorted(
        x.queued for x in routes
    )
    assert {x.engine.url for x in routes[2:]} == {a.url, b.url}  # still balanced
    for x in routes:
        x.first_token(x.engine, sent=0.0)
        x.first_token(x.engine, sent=0.0)  # a second first token changes nothing
    assert a.queued_tokens == b.queued_tokens == 0
    queues.close()
    assert a.queued_tokens == b.queued_tokens == 0 and not a.queued_work and not b.queued_work


def test_a_retry_and_an_engine_that_dies_leave_no_queued_tokens(prompter: Prompter) -> None:
    r = routing(prompter, ["http://a", "http://b"])
    a, b = r.engines.engines
    order, got = route(r, {"prompt": tokens(4, 900), "max_tokens": 1})
    assert got is not None
    chosen, retry = order
    with got.in_queue():
        assert chosen.queued_tokens == 900
        got.first_token(retry, sent=0.0)  # answered by the next engine: counted until the end
        assert (chosen.queued_tokens, retry.queued_tokens) == (900, 0)
    assert a.queued_tokens == b.queued_tokens == 0
    _, dying = route(r, {"prompt": tokens(5, 700), "max_tokens": 1})
    assert dying is not None
    with pytest.raises(ConnectionError), dying.in_queue():
        assert dying.engine.queued_tokens == 700
        raise ConnectionError("the engine died mid-request")
    assert a.queued_tokens == b.queued_tokens == 0
    with pytest.raises(AssertionError), got.in_queue():  # entered twice would count twice
        pass


def test_an_idle_engine_measures_its_prefill_rate_at_the_first_token(prompter: Prompter) -> None:
    r = routing(prompter, ["http://a"])
    (a,) = r.engines.engines
    _, got = route(r, {"prompt": tokens(6, 2000), "max_tokens": 1})
    assert got is not None and got.idle
    with got.in_queue():
        got.first_token(a, sent=-1.0)  # perf_counter() + 1 s after it was sent, roughly
    assert len(a.samples) == 1 and a.samples[0][0] == 2000
    _, busy = route(r, {"prompt": tokens(7, 2000), "max_tokens": 16})
    assert busy is not None and not busy.idle  # its answer's end is not its first token


def test_an_idle_engines_measure_counts_the_requests_that_went_ahead_of_it(
    prompter: Prompter,
) -> None:
    """A prompt that finds the engine idle, joined by others before its first token: on a
    hits-first engine the smaller ones went first, and their work is in its time; a larger
    one waited behind it and is not. (Counting only its own tokens measured a burst of twelve
    prompts on two engines at 44 tokens/s, a quarter of the rate of one prompt alone.)"""
    r = routing(prompter, ["http://a"])
    (a,) = r.engines.engines
    a.info = {**INFO, "scheduling": {"hits_first": True}}
    _, cold = route(r, {"prompt": tokens(11, 2000), "stream": True})
    assert cold is not None and cold.idle
    with cold.in_queue():
        _, hit = route(r, {"prompt": tokens(12, 300), "stream": True})
        _, big = route(r, {"prompt": tokens(13, 3000), "stream": True})
        assert hit is not None and big is not None and not hit.idle and not big.idle
        with hit.in_queue(), big.in_queue():
            hit.first_token(a, sent=0.0)  # it is no idle request: it measures nothing
            assert not a.samples
            cold.first_token(a, sent=-1.0)
    assert a.samples and a.samples[0][0] == 2300
    assert a.timing is None  # the next idle request measures afresh


def test_a_cold_prompt_is_routed_after_the_hits_of_its_burst(prompter: Prompter) -> None:
    """Two hits-first engines; each burst: a cold prompt, and 5 ms later a returning turn whose
    context is on one engine. The cold prompt waits (GATHER_S) for its companions, so the hit
    is placed first, on the engine holding its context, and the cold prompt on the other. (Routed
    at once, the cold prompt took an engine by turns, half the time the hit's.) A hit never
    waits."""
    r = routing(prompter, ["http://a", "http://b"])
    for engine in r.engines.engines:
        engine.info = {**INFO, "scheduling": {"hits_first": True}}

    async def burst(n: int) -> tuple[Route, Route]:
        held = tokens(20 + n, 4 * CHUNK + 30)
        holder = r.engines.engines[n % 2]
        r.index.replace(holder.url, {"dram": hexes(held)})
        cold_task = asyncio.create_task(r.route(PATH, {"prompt": tokens(30 + n, 3000)}))
        await asyncio.sleep(0.005)
        began = time.perf_counter()
        _, hit = await r.route(PATH, {"prompt": held})
        assert time.perf_counter() - began < 0.04  # the hit did not wait
        assert hit is not None and hit.engine is holder
        with hit.in_queue():
            _, cold = await cold_task
        assert cold is not None
        return hit, cold

    for n in range(2):
        hit, cold = asyncio.run(burst(n))
        assert cold.engine is not hit.engine and cold.waited_s >= 0.04
    assert r.gathered == 2


def test_resize_follows_the_whole_prompt_and_never_goes_negative(prompter: Prompter) -> None:
    r = routing(prompter, ["http://a"])
    (a,) = r.engines.engines
    _, got = route(r, {"prompt": tokens(8, 600), "max_tokens": 1})
    assert got is not None
    got.resize(+400)  # not in the queue yet: the route alone grows
    assert (got.queued, a.queued_tokens) == (1000, 0)
    with got.in_queue():
        assert a.queued_work == {1000: 1}
        got.resize(-300)
        assert (got.queued, a.queued_tokens, a.queued_work) == (700, 700, {700: 1})
        got.resize(-5000)
        assert (got.queued, a.queued_tokens) == (0, 0) and not a.queued_work
    assert a.queued_tokens == 0 and not a.queued_work


def test_a_prefill_engine_computes_and_the_decode_engine_loads(prompter: Prompter) -> None:
    r = routing(prompter, ["http://d"], prefill=["http://p"])
    d, p = r.engines.engines
    _, alone = route(r, {"prompt": tokens(9, 3000), "max_tokens": 1})
    assert alone is not None and alone.prefill is None  # no stream on d to stall
    d.in_flight = 4  # four streams decoding on d
    _, got = route(r, {"prompt": tokens(10, 3000), "max_tokens": 1})
    assert got is not None and got.split is not None
    assert got.prefill is not None and got.prefill.engine is p
    with got.prefill.in_queue():
        assert p.queued_tokens == 3000
        got.prefill.first_token(p, sent=0.0)
    got.computes_nothing()  # the prefill engine's answer came: d loads it from the shared tier
    with got.in_queue():
        assert d.queued_tokens == 0
    assert d.queued_tokens == p.queued_tokens == 0
