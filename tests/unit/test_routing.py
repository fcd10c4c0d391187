"""The router's decisions (kvtier.policy.routing) and its index (kvtier.router.index)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from kvtier.policy.routing import (
    DEFAULT_BANDWIDTH,
    PREFILL_HOP_S,
    CostRouting,
    EngineView,
    leading_hits,
    split_cost,
)
from kvtier.router.index import ChunkIndex
from kvtier.router.reuse import TAIL_BYTES, Decisions, cached_in_body, cached_in_stream

BPT = 23_040  # KV bytes per token of the demo model in bf16
RATE = 1000.0  # prefill tokens/s
BLOCK = 128


def view(name: str, queued: int = 0, **hits: int) -> EngineView:
    return EngineView(name, hits, queued, RATE)


def test_estimate_adds_wait_load_and_recompute() -> None:
    routing = CostRouting(BPT)
    got = routing.estimate(4000, view("a", queued=2000, dram=1024, disk=1024))
    load = 1024 * BPT / DEFAULT_BANDWIDTH["dram"] + 1024 * BPT / DEFAULT_BANDWIDTH["disk"]
    assert got.wait_s == pytest.approx(2.0)
    assert got.load_s == pytest.approx(load)
    assert got.recompute_s == pytest.approx((4000 - 2048) / RATE)
    assert got.ttft_s == pytest.approx(2.0 + load + 1.952)
    assert got.hit_tokens == 2048


def test_the_engine_holding_the_context_wins_unless_its_queue_costs_more() -> None:
    routing = CostRouting(BPT)
    holder, other = view("holder", dram=3840), view("other")
    assert routing.choose(4000, [other, holder]).chosen == 1
    busy = view("holder", queued=8000, dram=3840)  # 8 s of queue > 3.8 s of recompute
    assert routing.choose(4000, [other, busy]).chosen == 0


def test_on_hits_first_engines_a_hit_waits_only_for_smaller_work_and_a_cold_one_for_all() -> None:
    """A cold 8,000-token prompt queued on the engine holding a user's context: served in
    arrival order the user's hit would wait 8 s there and goes elsewhere to recompute; on a
    hits-first engine it goes first (at most one step of the cold prompt's: 0.5 s) and stays."""
    routing = CostRouting(BPT)
    holder = EngineView("holder", {"dram": 3840}, 8000, RATE, queued=(8000,))
    other = view("other")
    assert routing.choose(4000, [other, holder]).chosen == 0  # FCFS: 8 s of queue first
    first = replace(holder, hits_first=True)
    got = routing.estimate(4000, first)
    assert got.wait_s == pytest.approx(0.5)  # the step under way (STEP_S at RATE)
    assert routing.choose(4000, [other, first]).chosen == 1
    # A cold prompt waits for everything queued with no more work than its own.
    small = replace(first, queued=(100, 200, 8000), queued_tokens=8300)
    assert routing.estimate(4000, replace(small, hits={})).wait_s == pytest.approx(0.8)
    assert routing.estimate(9000, replace(small, hits={})).wait_s == pytest.approx(8.3)


def test_a_hit_goes_where_it_overtakes_no_one_if_that_costs_it_little() -> None:
    """An engine computes a cold prompt; a returning user's context is in its DRAM and in the
    shared tier. On the cold prompt's engine the hit would go first and delay the cold prompt
    by its own prefill; on the idle engine it loads from the shared tier at a small cost and
    delays no one: it goes there. With a long queue on the idle engine it stays."""
    routing = CostRouting(BPT)
    computing = EngineView("computing", {"dram": 1920}, 2000, 170.0, queued=(2000,))
    computing = replace(computing, hits_first=True)
    slow = {"shared": 1920 * BPT / 1.0}  # the shared tier loads it in 1 s
    idle = EngineView("idle", {"shared": 1920}, 0, 170.0, slow, hits_first=True)
    on_computing, on_idle = routing.estimate(2070, computing), routing.estimate(2070, idle)
    assert on_computing.imposed_s == pytest.approx(on_computing.load_s + 150 / 170)
    assert on_idle.imposed_s == 0
    assert on_computing.ttft_s < on_idle.ttft_s < on_computing.cost_s  # faster for it alone
    assert routing.choose(2070, [computing, idle]).chosen == 1
    busy = replace(idle, queued=(150, 150), queued_tokens=300)
    assert routing.choose(2070, [computing, busy]).chosen == 0
    # On an engine serving in arrival order nobody is overtaken.
    assert routing.estimate(2070, replace(computing, hits_first=False)).imposed_s == 0


def test_ties_go_to_the_least_queued_then_take_turns() -> None:
    routing = CostRouting(BPT)
    assert routing.choose(1000, [view("a", queued=100), view("b")]).chosen == 1
    picks = [routing.choose(1000, [view("a"), view("b")]).chosen for _ in range(4)]
    assert sorted(picks) == [0, 0, 1, 1]


def test_leading_hits_stop_at_the_first_missing_chunk_and_count_the_fastest_tier() -> None:
    tiers = [["disk", "dram"], ["shared"], [], ["dram"]]
    assert leading_hits(tiers, [256] * 4) == {"dram": 256, "shared": 256}


def test_a_cold_prompt_goes_through_the_prefill_engine_only_when_streams_would_stall() -> None:
    routing = CostRouting(BPT)
    decode, prefill = view("d"), view("p")
    idle = split_cost(routing, 3000, decode, 0, [prefill], BLOCK)
    assert not idle.disaggregate  # nobody to stall: the extra hop and transfer are waste
    busy = split_cost(routing, 3000, decode, 2, [prefill], BLOCK)
    assert busy.disaggregate and busy.prefill == 0
    # Straight: 3 s of TTFT and 3 s of stall for each of 2 streams.
    assert busy.direct_s == pytest.approx(3.0 * 3)
    assert busy.split_s < 3.0 + PREFILL_HOP_S + 0.5


def test_a_decode_engine_holding_most_of_the_prompt_skips_the_prefill_engine() -> None:
    routing = CostRouting(BPT)
    decode = view("d", dram=2816)  # 11 of the prompt's 11 whole chunks
    split = split_cost(routing, 2900, decode, 3, [view("p", dram=2816)], BLOCK)
    assert not split.disaggregate, split
    # Holding half of it, with streams to protect, the prefill engine is worth its hop.
    half = split_cost(routing, 2900, view("d", dram=1280), 3, [view("p")], BLOCK)
    assert half.disaggregate, half


def test_the_least_costly_prefill_engine_is_chosen() -> None:
    routing = CostRouting(BPT)
    prefills = [view("p0", queued=5000), view("p1", shared=2048), view("p2")]
    split = split_cost(routing, 3000, view("d"), 4, prefills, BLOCK)
    assert split.prefill == 1


def test_no_prefill_engine_means_straight() -> None:
    split = split_cost(CostRouting(BPT), 3000, view("d"), 4, [], BLOCK)
    assert not split.disaggregate and split.prefill is None


def test_index_predictions_stand_until_confirmed_or_expired() -> None:
    index = ChunkIndex()
    index.replace("e1", {"dram": ["k1"], "disk": ["k1", "k2"]})
    assert index.kinds("e1", ["k1", "k2", "k3"]) == [{"dram", "disk"}, {"disk"}]
    index.predict("e2", ["k1", "k2"], now=0.0)
    assert index.kinds("e2", ["k1", "k2"], now=1.0) == [{"predicted"}, {"predicted"}]
    index.apply("e2", "dram", {"kind": "stored", "keys": ["k1"]})
    assert index.kinds("e2", ["k1", "k2"], now=1.0) == [{"dram"}, {"predicted"}]
    assert index.kinds("e2", ["k1", "k2"], now=1e6) == [{"dram"}]  # the prediction expired
    index.apply("e1", "dram", {"kind": "evicted", "keys": ["k1"]})
    assert index.kinds("e1", ["k1"]) == [{"disk"}]
    index.drop("e1")
    assert index.kinds("e1", ["k1"]) == []
    assert index.counts() == {"e2": {"dram": 1}}


def test_chat_pieces_tokenize_as_the_whole_text() -> None:
    from kvtier.integrations.model import prepare_default_model
    from kvtier.router.prompts import Prompter

    prompter = Prompter(prepare_default_model())
    tok = prompter._tok
    texts = [
        "plain text with no special token",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi  there!\n\n<|im_end|>\n",
        "<|im_start|>user\nnaïve café — 東京 🙂 <|endoftext|>tail<|im_end|><|im_start|>assistant\n",
        "<|im_end|><|im_end|> spaces   before\t<|im_start|>   after",
        "<file_sep>x<filename>y<|im_start|>",
    ]
    for text in texts * 2:  # the second time, from remembered pieces
        assert prompter.encode_pieces(text) == tok.encode(text, add_special_tokens=False), text
    turns = [{"role": "user", "content": f"question {i} " * 50} for i in range(3)]
    body = {"messages": turns}
    whole = tok.encode(
        tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert prompter.chat_tokens(body) == whole
    assert prompter.chat_tokens(body) == whole


def test_an_engine_with_few_samples_is_priced_at_the_pods_prefill_rate() -> None:
    from kvtier.router.engines import EngineSet

    engines = EngineSet(["http://a:1", "http://b:1"], ChunkIndex())
    a, b = engines.engines
    assert engines.prefill_rate(a) == engines.prefill_rate(b)  # nothing measured yet
    a.measured_prefill(1000, 1.0)
    b.measured_prefill(1000, 1.4)  # one slow sample (it was decoding meanwhile)
    assert abs(engines.prefill_rate(a) / engines.prefill_rate(b) - 1) < 0.1
    for _ in range(40):  # a steady difference shows through in the end
        a.measured_prefill(1000, 1.0)
        b.measured_prefill(1000, 2.0)
    assert engines.prefill_rate(b) < 0.7 * engines.prefill_rate(a)
    a.measured_prefill(100, 5.0)  # too few tokens to say anything
    assert len(a.samples) == 32 and a.prefill_tokens_per_s == 1000


def test_equal_engines_share_sequential_cold_prompts_despite_noisy_samples() -> None:
    """A CI run sent four cold users one after another all to one of two equal engines: two
    samples each (0.36-0.60 s for ~600 tokens here) made one look >10% faster, and it kept
    winning. Noise is measured and discounted; a real difference still counts."""
    from kvtier.router.engines import EngineSet

    engines = EngineSet(["http://a:1", "http://b:1"], ChunkIndex())
    a, b = engines.engines
    for tokens, fast, slow in ((620, 0.36, 0.60), (560, 0.40, 0.55)):
        a.measured_prefill(tokens, fast)
        b.measured_prefill(tokens, slow)
    assert b.prefill_tokens_per_s < 0.75 * a.prefill_tokens_per_s  # what the samples say
    routing = CostRouting(bytes_per_token=1000)
    chosen = []
    for _ in range(4):
        views = [EngineView(e.url, prefill_tokens_per_s=engines.prefill_rate(e)) for e in (a, b)]
        chosen.append(routing.choose(600, views).best.engine)
    assert set(chosen) == {a.url, b.url}, chosen
    # Many samples, as noisy as this host's (+-10%), and B steadily 30% slower: it shows.
    for i in range(32):
        jitter = 1.1 if i % 2 else 0.9
        a.measured_prefill(600, 0.45 * jitter)
        b.measured_prefill(600, 0.45 * 1.3 * jitter)
    ratio = engines.prefill_rate(a) / engines.prefill_rate(b)
    assert 1.15 < ratio < 1.35, ratio
    views = [EngineView(e.url, prefill_tokens_per_s=engines.prefill_rate(e)) for e in (a, b)]
    assert {routing.choose(600, views).best.engine for _ in range(4)} == {a.url}


def test_a_long_new_chat_is_keyed_from_its_exact_leading_tokens() -> None:
    from kvtier.bench.workload import document
    from kvtier.integrations.model import prepare_default_model
    from kvtier.router.prompts import Prompter

    prompter = Prompter(prepare_default_model())
    for seed in range(2):
        doc = document(seed, 6000, seed) + " tail  with   odd\\tspacing, 12345 and ünïcödé!"
        body = {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": doc},
            ]
        }
        whole = prompter._tok.encode(prompter.chat_text(body), add_special_tokens=False)
        lead = prompter.leading("/v1/chat/completions", body, 256)
        assert not lead.complete and lead.finish is not None
        assert 512 <= len(lead.tokens) < len(whole) // 2
        assert lead.tokens == whole[: len(lead.tokens)], seed
        assert abs(lead.total - len(whole)) < 0.1 * len(whole)
        assert lead.finish() == whole
        again = prompter.leading("/v1/chat/completions", body, 256)  # its pieces are known
        assert again.complete and again.tokens == whole


def sse(*events: dict[str, Any]) -> bytes:
    """A completion stream as vLLM sends it (CRLF-free), ``[DONE]`` last."""
    lines = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return b"".join(lines) + b"data: [DONE]\n\n"


def usage(cached: int) -> dict[str, Any]:
    details = {"cached_tokens": cached}
    return {"choices": [], "usage": {"prompt_tokens": 900, "prompt_tokens_details": details}}


def test_the_reused_tokens_come_from_an_answer_or_the_end_of_a_stream() -> None:
    assert cached_in_body(json.dumps(usage(768)).encode()) == 768
    assert cached_in_body(b'{"usage": {"prompt_tokens": 9}}') is None  # details off
    assert cached_in_body(b'{"cached_tokens": [[[[') is None  # not JSON: no figure, no error
    stream = sse({"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}, usage(640))
    assert cached_in_stream(stream) == 640
    assert cached_in_stream(stream.replace(b"\n", b"\r\n")) == 640
    assert cached_in_stream(stream[-TAIL_BYTES:][5:]) == 640  # a tail cut mid-event first
    assert cached_in_stream(sse({"choices": [{"text": "a"}]})) is None  # usage not asked for


def test_routing_precision_compares_what_was_predicted_with_what_was_reused() -> None:
    made = Decisions()
    full = made.record("http://a", "engine hit", 1000, predicted=768)
    made.answered(full, 768)
    short = made.record("http://a", "engine hit", 1000, predicted=512)
    made.answered(short, 256)  # half of it had been evicted
    surprise = made.record("http://b", "cold", 1000, predicted=0)
    made.answered(surprise, 128)  # vLLM's prefix cache had a block the router did not know
    pd = made.record("http://b", "cold", 1000, predicted=0)
    pd.measured = False  # went through a prefill engine: not counted
    made.answered(pd, 896)
    made.answered(full, 0)  # a second report of one request changes nothing
    state = made.state()
    assert (state["measured"], state["predicted_tokens"], state["reused_tokens"]) == (3, 1280, 1152)
    assert state["precision"] == pytest.approx(1024 / 1280)
    assert state["coverage"] == pytest.approx(1024 / 1152)
    assert [d["reused"] for d in made.recent_state()] == [768, 256, 128, 896]
