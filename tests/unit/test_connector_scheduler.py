"""The connector's scheduler side, fed with vLLM's own Request and SchedulerOutput objects:
hits and misses, tails, a vLLM prefix hit, salts, background loads (one whose request ends
while it runs), a preempted request, prefetches and the worker's DRAM mirror. No engine runs:
the store is a real one, filled by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm.v1.outputs import KVConnectorOutput

from kvtier.config import MemoryTierConfig, StoreConfig
from kvtier.factory import open_store
from kvtier.integrations.vllm.context import ConnectorContext, ConnectorOptions
from kvtier.integrations.vllm.messages import KvtierWorkerMetadata, LoadSpec, SaveSpec
from kvtier.integrations.vllm.scheduler import SchedulerSide
from kvtier.store import TieredStore

from connectorsteps import (
    BLOCK,
    TAIL_SHAPE,
    blocks_for,
    cached,
    connector_store,
    new,
    output,
    request,
    side,
)
from kvhelpers import chunk, chunks_for, prompt


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TieredStore]:
    """DRAM over disk, as ``kvtier serve`` has them."""
    yield from connector_store(tmp_path)


def test_a_cold_prompt_saves_each_chunk_once_then_its_tail(store: TieredStore) -> None:
    s = side(store, write_through=True)  # saves as the prompt is computed
    tokens = prompt(1, 3, extra=13)  # 61 tokens: 3 chunks, one more full block, 5 tokens
    req = request("a", tokens)
    s.arrived(req)
    assert s.matched(req, 0) == (0, False)
    s.allocated(req, [], 0)
    blocks = blocks_for(61)
    # Chunked prefill: 20 tokens, then the other 41.
    first = s.step(output([new(req, blocks, 0)], scheduled={"a": 20}))
    assert first.loads == [] and first.prefetches == []
    assert first.saves == [SaveSpec("a", tokens[:16], None, blocks[:2], 0)]
    second = s.step(output(cached=cached("a", None, 20, False), scheduled={"a": 41}))
    assert second.saves == [
        SaveSpec("a", tokens[:48], None, blocks[:6], 1),
        SaveSpec("a", tokens[:56], None, blocks[:7], 3, tail=True),
    ]
    decode = s.step(output(cached=cached("a", None, 61, False), scheduled={"a": 1}))
    assert decode.saves == []
    assert s.finished(req) is False and s.requests == {}


def test_a_hit_loads_whole_chunks_and_leaves_the_last_block_to_compute(
    store: TieredStore,
) -> None:
    s = side(store)
    tokens = prompt(2, 3)  # 48 tokens, all stored
    store.put(tokens, s.ctx.namespace(None), chunks_for(2, 3))
    req = request("b", tokens)
    s.arrived(req)
    # vLLM must compute the last token: its block is recomputed, 40 tokens load.
    assert s.matched(req, 0) == (40, False)
    blocks = blocks_for(48)
    s.allocated(req, blocks, 40)
    meta = s.step(output([new(req, blocks, 40)], scheduled={"b": 8}))
    assert meta.loads == [LoadSpec("b", tokens[:48], None, blocks[:5], 0, 40)]
    assert meta.saves == []  # held already
    # A prompt sharing its first chunk, with vLLM's own prefix cache holding 16 tokens.
    other = request("c", tokens[:16] + prompt(3, 1, extra=4))
    assert s.matched(other, 16) == (0, False)  # kvtier holds nothing beyond vLLM's hit
    longer = request("d", tokens + prompt(4, 1))
    assert s.matched(longer, 16) == (32, False)
    s.allocated(longer, blocks_for(64), 32)
    meta = s.step(output([new(longer, blocks_for(64), 48)], scheduled={"d": 16}))
    assert meta.loads == [LoadSpec("d", tokens[:48], None, blocks_for(48), 16, 48)]


def test_a_stored_tail_is_reused_by_a_longer_prompt(store: TieredStore) -> None:
    s = side(store, write_through=True)  # saves as the prompt is computed
    tokens = prompt(5, 3, extra=BLOCK)  # 56 tokens: 3 chunks and a one-block tail
    store.put(tokens, s.ctx.namespace(None), [*chunks_for(5, 3), chunk(9, TAIL_SHAPE)], tail=True)
    grown = tokens + prompt(6, 1, extra=4)
    req = request("t", grown)
    assert s.matched(req, 0) == (56, False)
    blocks = blocks_for(len(grown))
    s.allocated(req, blocks, 56)
    meta = s.step(output([new(req, blocks, 56)], scheduled={"t": len(grown) - 56}))
    assert meta.loads == [LoadSpec("t", tokens, None, blocks[:7], 0, 56, tail=True)]
    # Its own chunk 3 (tokens 48-64) is computed now and saved, then its own tail (64-72).
    assert [(x.first_chunk, x.tail, len(x.tokens)) for x in meta.saves] == [
        (3, False, 64),
        (4, True, 72),
    ]


def test_a_salt_hits_its_own_chunks_only(store: TieredStore) -> None:
    s = side(store)
    tokens = prompt(7, 2, extra=3)
    store.put(tokens, s.ctx.namespace("tenant-a"), chunks_for(7, 2))
    assert s.matched(request("x", tokens, salt="tenant-a"), 0) == (32, False)
    assert s.matched(request("y", tokens, salt="tenant-b"), 0) == (0, False)
    assert s.matched(request("z", tokens), 0) == (0, False)


def test_a_background_load_keeps_the_blocks_of_a_request_that_ends_meanwhile(
    store: TieredStore,
) -> None:
    s = side(store, loads="async")
    tokens = prompt(8, 2, extra=5)
    store.put(tokens, s.ctx.namespace(None), chunks_for(8, 2))
    req = request("bg", tokens)
    s.arrived(req)
    assert s.matched(req, 0) == (32, True)
    blocks = blocks_for(len(tokens))
    s.allocated(req, blocks, 32)  # vLLM parks it in WAITING_FOR_REMOTE_KVS
    meta = s.step(output())  # planned with the next step, though the request is not scheduled
    assert meta.loads == [LoadSpec("bg", tokens[:32], None, blocks[:4], 0, 32, background=True)]
    assert meta.prefetches == []  # the load reads it already
    # It ends (aborted) while the worker writes into its blocks: vLLM must keep them.
    assert s.finished(req) is True and s.requests == {}
    s.worker_reported(KVConnectorOutput(finished_recving={"bg"}))
    assert s.loading == set()
    # Once the load is done, a new request's blocks are free to go.
    again = request("bg2", tokens)
    s.matched(again, 0)
    assert s.finished(again) is False


def test_auto_loads_in_the_background_only_from_below_dram_while_others_run(
    store: TieredStore,
) -> None:
    s = side(store, loads="auto")
    running = request("run", prompt(9, 1))
    s.matched(running, 0)
    s.allocated(running, [], 0)
    s.step(output([new(running, blocks_for(16), 0)], scheduled={"run": 16}))
    in_dram = prompt(10, 2, extra=1)
    store.put(in_dram, s.ctx.namespace(None), chunks_for(10, 2))
    assert s.matched(request("dram", in_dram), 0) == (32, False)  # DRAM: before the pass
    on_disk = prompt(11, 2, extra=1)
    store.put(on_disk, s.ctx.namespace(None), chunks_for(11, 2))
    assert store.flush(timeout=10)
    for key in store.keys(on_disk, s.ctx.namespace(None)):
        store.tiers[0].delete(key)
    assert s.matched(request("disk", on_disk), 0) == (32, True)  # disk, others run
    s.finished(running)
    assert s.matched(request("disk", on_disk), 0) == (32, False)  # no one else to stall


def test_a_preempted_request_loads_again_into_its_new_blocks(store: TieredStore) -> None:
    s = side(store, write_through=True)  # saves as the prompt is computed
    tokens = prompt(12, 2, extra=9)  # 41 tokens, 2 chunks stored
    store.put(tokens, s.ctx.namespace(None), chunks_for(12, 2))
    req = request("p", tokens)
    assert s.matched(req, 0) == (32, False)
    s.allocated(req, blocks_for(41), 32)
    s.step(output([new(req, blocks_for(41), 32)], scheduled={"p": 9}))
    # Preempted, then back: vLLM looks it up again and gives it other blocks.
    assert s.matched(req, 0) == (32, False)
    moved = blocks_for(41, first=100)
    s.allocated(req, moved, 32)
    meta = s.step(output(cached=cached("p", moved, 32, True), scheduled={"p": 9}))
    assert meta.loads == [LoadSpec("p", tokens[:32], None, moved[:4], 0, 32)]
    # Its tail (40 tokens, 5 blocks) is saved again from the new blocks, the chunks are not.
    assert meta.saves == [SaveSpec("p", tokens[:40], None, moved[:5], 2, tail=True)]


def test_a_waiting_request_is_prefetched_once_and_a_scheduled_one_never(
    store: TieredStore,
) -> None:
    s = side(store)
    waiting, short, scheduled = (
        request("w", prompt(13, 2)),
        request("s", prompt(14, 0, 9)),
        request("n", prompt(15, 2)),
    )
    for r in (waiting, short, scheduled):
        s.arrived(r)
    meta = s.step(output([new(scheduled, blocks_for(32), 0)], scheduled={"n": 32}))
    assert meta.prefetches == [(waiting.prompt_token_ids, None)]  # a short one: nothing to warm
    assert s.step(output()).prefetches == []


def test_the_mirror_of_the_worker_dram_counts_as_hits(store: TieredStore) -> None:
    s = side(store)
    tokens = prompt(16, 2, extra=2)
    keys: list[bytes] = list(store.keys(tokens, s.ctx.namespace(None)))
    s.worker_reported(KVConnectorOutput(kv_connector_worker_meta=KvtierWorkerMetadata(stored=keys)))
    assert s.matched(request("m", tokens), 0) == (32, False)
    s.worker_reported(
        KVConnectorOutput(kv_connector_worker_meta=KvtierWorkerMetadata(dropped=keys[1:]))
    )
    assert s.matched(request("m", tokens), 0) == (16, False)


def test_a_tail_is_cut_to_16_tokens_not_to_a_block(tmp_path: Path) -> None:
    """With 32-token blocks, a prompt's tail ends on a 16-token granule, inside a block: a
    returning turn recomputes at most 15 of its previous prompt's tokens, not up to 31."""
    chunk_tokens, block = 64, 32
    config = StoreConfig(chunk_tokens=chunk_tokens, tiers=(MemoryTierConfig(capacity=1 << 24),))
    with open_store(config) as opened:
        args = (config, block, chunk_tokens, "m", "r1", "float16", opened)
        ctx = ConnectorContext(ConnectorOptions(write_through=True), *args)
        s = SchedulerSide(ctx, lambda: [])
        assert ctx.granule == 16
        tokens = prompt(7, 6, extra=13)  # 109 tokens: a chunk, then 45 tokens
        req = request("a", tokens)
        s.arrived(req)
        assert s.matched(req, 0) == (0, False)
        blocks = [4, 5, 6, 7]
        meta = s.step(output([new(req, blocks, 0)], scheduled={"a": 109}))
        assert meta.saves == [
            SaveSpec("a", tokens[:64], None, blocks[:2], 0),
            SaveSpec("a", tokens[:96], None, blocks[:3], 1, tail=True),  # 32 + 16 tokens
        ]
        s.finished(req)
        shape = (2, 2, chunk_tokens, 2, 8)
        tail = chunk(3, (2, 2, 32, 2, 8))
        opened.put(tokens[:96], ctx.namespace(None), [chunk(1, shape), tail], tail=True)
        grown = tokens + prompt(8, 1, extra=4)[:20]  # the next turn: 129 tokens
        back = request("b", grown)
        assert s.matched(back, 0) == (96, False)
        s.allocated(back, [9, 10, 11, 12, 13], 96)
        meta = s.step(output([new(back, [9, 10, 11, 12, 13], 96)], scheduled={"b": 33}))
        assert meta.loads == [LoadSpec("b", tokens[:96], None, [9, 10, 11], 0, 96, tail=True)]
        # A prompt that is the stored one's first 100 tokens stops at 96 too; the stored
        # prompt itself (96 held) must compute its last token: it loads 80.
        assert s.matched(request("c", tokens[:100]), 0) == (96, False)
        assert s.matched(request("d", tokens[:96]), 0) == (80, False)
