"""TieredStore over a real redis-server: Redis below DRAM, and its TTL."""

from __future__ import annotations

import numpy as np

from kvtier import TieredStore
from kvtier.redis_process import RedisServer
from kvtier.tiers import MemoryTier, RedisTier

from kvhelpers import CHUNK_TOKENS, NS, SHAPE, chunk, chunks_for, prompt, same

CHUNK_BYTES = chunk(0).nbytes


def test_redis_below_dram(redis_server: RedisServer, prefix: str) -> None:
    tokens = prompt(14, 3)
    redis_tier = RedisTier(redis_server.url, prefix=prefix)
    with TieredStore([MemoryTier(1 << 20), redis_tier], CHUNK_TOKENS) as store:
        store.put(tokens, NS, chunks_for(14, 3))
        store.flush()
    fresh = RedisTier(redis_server.url, prefix=prefix)
    with TieredStore([MemoryTier(1 << 20), fresh], CHUNK_TOKENS) as store:
        assert store.lookup(tokens, NS).tiers == ["redis"] * 3
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(3)]
        assert store.get_into(tokens, NS, dests).tiers == ["redis"] * 3
        assert np.array_equal(dests[2], chunk(14002).numpy())
        assert store.lookup(tokens, NS).tiers == ["memory"] * 3
    fresh = RedisTier(redis_server.url, prefix=prefix)
    with TieredStore([MemoryTier(1 << 20), fresh], CHUNK_TOKENS) as store:
        got = store.get(tokens, NS, payload_bytes=[CHUNK_BYTES] * 3)
        assert got.tiers == ["redis"] * 3 and same(got.chunks[2], chunk(14002))
        assert store.lookup(tokens, NS).tiers == ["memory"] * 3


def test_redis_ttl_is_applied(redis_server: RedisServer, prefix: str) -> None:
    import redis

    tier = RedisTier(redis_server.url, prefix=prefix, ttl_s=60)
    tier.put_many([(NS.root(16), b"x" * 10)])
    ttl = redis.Redis.from_url(redis_server.url).ttl(tier.redis_key(NS.root(16)))
    assert 0 < ttl <= 60
    tier.close()
