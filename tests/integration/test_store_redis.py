"""TieredStore over a real redis-server: Redis below DRAM, quantized, and its TTL."""

from __future__ import annotations

import time

import numpy as np

from kvtier import TieredStore, codec
from kvtier.codec import Compression
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


def test_a_quantized_redis_tier_sends_each_chunk_once(
    redis_server: RedisServer, prefix: str
) -> None:
    """A Redis tier storing int8: a load into raw-sized buffers (get_into) and a sized read
    (get with payload_bytes) decode each chunk from the one GET that brought it (Redis counts
    three GETs, where reading the chunks again after a raw-sized read would count six),
    close to the KV put; the DRAM copies are then raw."""
    import redis

    tokens = prompt(15, 3)
    comps = [Compression.NONE, Compression.INT8]
    originals = chunks_for(15, 3)
    tier = RedisTier(redis_server.url, prefix=prefix)
    with TieredStore([MemoryTier(1 << 20), tier], CHUNK_TOKENS, compression=comps) as store:
        store.put(tokens, NS, originals)
        store.flush()
    client = redis.Redis.from_url(redis_server.url)
    sizes = [client.strlen(tier.redis_key(k)) for k in store.keys(tokens, NS)]
    assert all(0 < s < 96 + CHUNK_BYTES * 0.7 for s in sizes)  # stored int8, not raw

    def gets() -> int:
        stats = client.info("commandstats").get("cmdstat_get", {})  # type: ignore[union-attr]
        return int(stats.get("calls", 0))

    for sized in (False, True):
        fresh = RedisTier(redis_server.url, prefix=prefix)
        with TieredStore([MemoryTier(1 << 20), fresh], CHUNK_TOKENS, compression=comps) as store:
            before = gets()
            if sized:
                got = store.get(tokens, NS, payload_bytes=[CHUNK_BYTES] * 3)
                assert got.tiers == ["redis"] * 3
                loaded = [c.numpy() for c in got.chunks]
            else:
                loaded = [np.zeros(SHAPE, dtype=np.float16) for _ in range(3)]
                assert store.get_into(tokens, NS, loaded).tiers == ["redis"] * 3
            assert gets() - before == 3
            for kv, original in zip(loaded, originals, strict=True):
                a, b = kv.astype(np.float32), original.numpy().astype(np.float32)
                assert 0 < np.abs(a - b).max() < 0.02 * np.abs(b).max()
            held = store.tiers[0].get_many(store.keys(tokens, NS))
            assert all(codec.read_header(b).compression == Compression.NONE for b in held)  # type: ignore[arg-type]
            assert store.lookup(tokens, NS).tiers == ["memory"] * 3


def test_threads_read_on_connections_of_their_own(redis_server: RedisServer, prefix: str) -> None:
    """A reader busy on one thread does not hold up another's read: that one opens a second
    connection; idle connections are reused, and closed with the tier."""
    import redis

    from kvtier.tiers.resp import BulkReader, BulkReaders

    client = redis.Redis.from_url(redis_server.url)
    client.set(f"{prefix}:a", b"x" * 1000)

    def getting() -> int:  # connections whose last command was a GET: the readers'
        return sum(c["cmd"] == "get" for c in client.client_list())

    readers = BulkReaders(lambda: BulkReader("127.0.0.1", redis_server.port))
    buf = bytearray(1000)
    for _ in range(3):
        assert readers.get_into([f"{prefix}:a".encode()], [[memoryview(buf)]]) == [1000]
    assert getting() == 1  # one thread, one connection, reused
    with readers.connection() as busy:
        assert readers.get_into([f"{prefix}:a".encode()], [[memoryview(buf)]]) == [1000]
        assert busy.get_into([f"{prefix}:a".encode()], [[memoryview(buf)]]) == [1000]
    assert getting() == 2 and bytes(buf) == b"x" * 1000
    readers.close()
    deadline = time.monotonic() + 5
    while getting() and time.monotonic() < deadline:  # the server sees the closes soon after
        time.sleep(0.01)
    assert getting() == 0
