"""The router's parts against real things: the shared tier in a real redis-server, and vLLM's
own KV event objects (vLLM imported: seconds)."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.router.index import ChunkIndex

BPT = 23_040  # KV bytes per token of the demo model in bf16
RATE = 1000.0  # prefill tokens/s
BLOCK = 128


def test_the_shared_tier_answers_within_a_budget_and_late_answers_are_kept(
    redis_server: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import time

    import redis

    from kvtier.router import lookup
    from kvtier.router.lookup import SharedTier

    monkeypatch.setattr(lookup, "SHARED_TIMEOUT_S", 5.0)  # slow, not failing
    held, missing = b"\x01" * 16, b"\x02" * 16
    plain = redis.Redis.from_url(redis_server.url)
    plain.set(f"{prefix}:v1:{held.hex()}".encode(), b"x")

    async def run() -> None:
        shared = SharedTier(redis_server.url, prefix)
        await shared.warm()
        await shared.holds([held, missing])
        await asyncio.sleep(0.2)  # on a busy machine the first answer may come late
        assert await shared.holds([held, missing]) == [True, False]
        late = shared.late
        # The server busy for 0.6 s (as when it takes an engine's long write): the answer
        # does not come within the budget, and the request goes on without it.
        other = b"\x03" * 16
        plain.set(f"{prefix}:v1:{other.hex()}".encode(), b"x")
        plain.execute_command("CLIENT", "PAUSE", "600", "ALL")  # type: ignore[no-untyped-call]
        began = time.perf_counter()
        assert await shared.holds([held, other]) == [True, False]  # held: remembered
        assert time.perf_counter() - began < 0.3  # not the 0.6 s the server is busy
        assert shared.late == late + 1
        await asyncio.sleep(0.9)  # the late answer arrives and is kept
        assert await shared.holds([held, other]) == [True, True]
        await shared.close()

    asyncio.run(run())


def test_vllm_block_events_become_the_engines_chunk_keys() -> None:
    """vLLM's own KV events (encoded by vLLM's classes, as its publisher sends them) key the
    chunks and tails of kvtier's chain; evictions, lost events and unknown parents drop keys."""
    import msgspec
    import numpy as np
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

    from kvtier.keys import Namespace, chunk_keys, tail_key
    from kvtier.router.engines import EngineSet

    url = "http://engine"
    engines = EngineSet([url], ChunkIndex())
    engine = engines.engines[0]
    engine.info = {"namespace": {"model": "m", "kv_dtype": "float32"}, "chunk_tokens": 256}
    blocks = engines._block_keys(engine)
    tokens = np.random.default_rng(3).integers(0, 49_000, 700).tolist()
    salted = Namespace("m", kv_dtype="float32", tenant_salt="tenant-a")
    full = chunk_keys(tokens, salted, 256)  # 2 full chunks

    def stored(first: int, count: int, parent: Any, salt: bool = False) -> BlockStored:
        return BlockStored(
            block_hashes=[f"h{i}".encode() for i in range(first, first + count)],
            parent_block_hash=parent,
            token_ids=tokens[first * BLOCK : (first + count) * BLOCK],
            block_size=BLOCK,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            extra_keys=[("tenant-a",) if salt and i == 0 else None for i in range(count)],
        )

    last: list[int | None] = [None]

    def send(seq: int, *events: Any) -> int:
        payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=list(events)))
        frames = [b"kvtier", seq.to_bytes(8, "big"), payload]
        last[0] = seen = engines._apply_blocks(engine, blocks, frames, last[0])
        assert seen is not None
        return seen

    def gpu(keys: list[Any]) -> int:
        return sum("gpu" in k for k in engines.index.kinds(url, [k.hex() for k in keys]))

    send(0, stored(0, 3, None, salt=True))
    send(1, stored(3, 2, b"h2"))
    tail = tail_key(full[1], tokens[512:640])
    assert gpu([*full, tail]) == 3, "two chunks and the tail of block 4 are in vLLM's cache"
    assert gpu([tail_key(salted.root(256), tokens[:128])]) == 1
    assert gpu(chunk_keys(tokens, Namespace("m", kv_dtype="float32"), 256)) == 0, "salt"

    send(2, BlockRemoved(block_hashes=[b"h1"], medium="GPU"))
    assert gpu(full) == 0, "the first chunk lost its second block"
    send(3, stored(1, 1, b"h0"))
    assert gpu(full) == 2
    assert send(4, stored(9, 1, b"unknown")) == 4 and blocks.unkeyed == 1

    send(9, BlockRemoved(block_hashes=[b"nothing"], medium="GPU"))  # 5 to 8 were lost
    assert engine.block_gaps == 1 and gpu(full) == 0
