"""The object tier (G4) in a store, against a real SeaweedFS: two engines' stores sharing a
bucket, restart, eviction at the bound, a store that dies, throttles or stalls, corrupt objects.

Faults a healthy SeaweedFS never shows (503 SlowDown, a stalled answer) come from a small
loopback proxy in front of it that forwards every request unchanged until told otherwise."""

from __future__ import annotations

import http.client
import http.server
import socketserver
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from kvtier import TieredStore
from kvtier.keys import ChunkKey
from kvtier.seaweed_process import SeaweedFS
from kvtier.tiers import MemoryTier, S3Tier
from kvtier.tiers.s3_client import S3Client, S3Error

from kvhelpers import CHUNK_TOKENS, NS, SHAPE, chunk, chunks_for, prompt, same


def s3_tier(server: SeaweedFS, prefix: str, capacity: int = 1 << 30) -> S3Tier:
    return S3Tier(server.client(), capacity, prefix=prefix, miss_ttl_s=0.2)


def objects(client: S3Client, prefix: str) -> list[str]:
    return sorted(name for name, _, _ in client.list(prefix + "/"))


def test_two_engines_share_the_bucket_and_each_chunk_is_stored_once(
    seaweed: SeaweedFS, prefix: str
) -> None:
    first_tier, second_tier = s3_tier(seaweed, prefix), s3_tier(seaweed, prefix)
    racing = s3_tier(seaweed, prefix)  # a third engine, about to upload the same chunks
    first = TieredStore([MemoryTier(1 << 20), first_tier], CHUNK_TOKENS)
    second = TieredStore([MemoryTier(1 << 20), second_tier], CHUNK_TOKENS)
    tokens = prompt(1, 3)
    assert second.lookup(tokens, NS).hit_chunks == 0  # a miss before anyone wrote
    first.put(tokens, NS, chunks_for(1, 3))
    first.flush()
    time.sleep(0.3)  # past the remembered miss: the second engine asks the bucket again
    assert second.lookup(tokens, NS).tiers == ["s3"] * 3
    got = second.get(tokens, NS)
    assert [same(c, e) for c, e in zip(got.chunks, chunks_for(1, 3), strict=True)] == [True] * 3
    # The second engine computed the same prompt: its write-behind finds them held.
    second.put(tokens, NS, chunks_for(1, 3))
    second.put(prompt(2, 2), NS, chunks_for(2, 2))  # new: uploaded
    second.flush()
    assert second_tier.uploads == 2
    # The racing engine's index never heard of them: If-None-Match keeps the first copies.
    blobs = [(k, bytes(first_tier.get_many([k])[0] or b"")) for k in first.keys(tokens, NS)]
    raced = racing.put_many([(k, b"another copy") for k, _ in blobs])
    assert raced.stored == [True] * 3 and raced.existing == 3  # kvtier:tier_writes_existing
    assert racing.skipped == 3 and racing.uploads == 0
    assert [bytes(b or b"") for b in racing.get_many([k for k, _ in blobs])] == [
        b for _, b in blobs
    ]
    assert len(objects(seaweed.client(), prefix)) == 5  # 3 + 2, each stored once
    for store in (first, second):
        store.close()
    racing.close()


def test_restart_rebuilds_the_index_and_a_stale_entry_is_a_miss(
    seaweed: SeaweedFS, prefix: str
) -> None:
    tokens = prompt(3, 4)
    with TieredStore([s3_tier(seaweed, prefix)], CHUNK_TOKENS) as store:
        store.put(tokens, NS, chunks_for(3, 4))
        keys = store.keys(tokens, NS)
    tier = s3_tier(seaweed, prefix)
    usage = tier.usage()
    assert usage.chunks == 4 and usage.bytes > 4 * chunk(0).nbytes
    seaweed.client().delete(tier.object_name(keys[2]))  # deleted by someone else
    with TieredStore([tier], CHUNK_TOKENS) as store:
        assert store.lookup(tokens, NS).hit_chunks == 4  # the index still lists it
        got = store.get(tokens, NS)
        assert len(got.chunks) == 2  # the stale entry is a miss, not an error
        assert tier.usage().chunks == 3
        assert store.stats().tiers["s3"].errors == 0


def test_eviction_keeps_the_bound_and_never_touches_another_prefix(
    seaweed: SeaweedFS, prefix: str
) -> None:
    client = seaweed.client()
    client.put(prefix + "-other/v1/" + "ab" * 16, b"not ours")
    size = len(bytes(chunk(0).data)) + 200  # a chunk's object, header included, with room
    tier = s3_tier(seaweed, prefix, capacity=3 * size)
    with TieredStore([tier], CHUNK_TOKENS) as store:
        for seed in range(5):
            store.put(prompt(10 + seed, 1), NS, chunks_for(10 + seed, 1))
        assert len(objects(client, prefix)) == 3
        assert tier.usage().bytes <= 3 * size
        assert store.lookup(prompt(14, 1), NS).hit_chunks == 1  # the newest stay
        assert store.lookup(prompt(10, 1), NS).hit_chunks == 0
    assert objects(client, prefix + "-other") == [prefix + "-other/v1/" + "ab" * 16]
    restarted = s3_tier(seaweed, prefix, capacity=3 * size)
    assert restarted.usage().chunks == 3  # within the bound after a restart too
    restarted.close()


def test_flipped_bytes_in_an_object_are_a_miss_removed_and_counted(
    seaweed: SeaweedFS, prefix: str
) -> None:
    tokens = prompt(4, 2)
    tier = s3_tier(seaweed, prefix)
    with TieredStore([tier], CHUNK_TOKENS) as store:
        store.put(tokens, NS, chunks_for(4, 2))
        name = tier.object_name(store.keys(tokens, NS)[0])
        client = seaweed.client()
        value = bytearray(client.get(name) or b"")
        value[300] ^= 0x80
        client.put(name, value)
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(2)]
        assert store.get_into(tokens, NS, dests).chunks == 0
        assert store.stats().tiers["s3"].corruptions == 1
        assert client.head(name) is None  # removed
        store.put(tokens, NS, chunks_for(4, 2))  # uploaded again, whole
        got = store.get(tokens, NS, payload_bytes=[chunk(0).nbytes] * 2)
        assert [same(c, e) for c, e in zip(got.chunks, chunks_for(4, 2), strict=True)] == [True] * 2


class FaultProxy:
    """A loopback HTTP proxy to ``port``: forwards, or answers 503 SlowDown, or stalls."""

    def __init__(self, port: int):
        self.mode = "forward"
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if proxy.mode == "slow-head" and self.command == "HEAD":
                    time.sleep(0.3)  # a far store's round trip, for probes only
                if proxy.mode == "stall":
                    time.sleep(5)
                    self.close_connection = True
                    return
                if proxy.mode == "no-conditional" and self.headers.get("if-none-match"):
                    text = b"<Error><Code>NotImplemented</Code></Error>"
                    self.send_response(501)
                    self.send_header("content-length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                if proxy.mode == "slowdown":
                    text = b"<Error><Code>SlowDown</Code></Error>"
                    self.send_response(503)
                    self.send_header("content-length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                headers = dict(self.headers.items())
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                size = answer.getheader("content-length") if self.command == "HEAD" else None
                self.send_header("content-length", size or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_HEAD = do_DELETE = _any

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(seaweed: SeaweedFS) -> Iterator[FaultProxy]:
    p = FaultProxy(seaweed.ports["s3"])
    yield p
    p.close()


def test_a_store_refusing_conditional_writes_gets_a_head_before_each_put(
    seaweed: SeaweedFS, proxy: FaultProxy, prefix: str
) -> None:
    proxy.mode = "no-conditional"  # 501 NotImplemented to If-None-Match, as some stores do
    client = S3Client(
        f"http://127.0.0.1:{proxy.port}", seaweed.bucket, "us-east-1", seaweed.credentials
    )
    first = S3Tier(client, 1 << 30, prefix=prefix)
    racing = S3Tier(client, 1 << 30, prefix=prefix)  # listed before: no index of the first's
    assert first.put_many([(k, b"first") for k in KEYS]).stored == [True] * 3
    assert first.uploads == 3 and first.skipped == 0
    result = S3Tier(client, 1 << 30, prefix=prefix + "b").put_many([(KEYS[0], b"x")])
    assert result.stored == [True] and result.error is None  # the fallback from the start
    raced = racing.put_many([(k, b"second") for k in KEYS])
    assert raced.existing == 3 and [bytes(b or b"") for b in first.get_many(KEYS)] == [b"first"] * 3


def test_a_slow_probe_never_holds_a_lookup_past_its_budget(
    seaweed: SeaweedFS, proxy: FaultProxy, prefix: str
) -> None:
    """Lookups run in vLLM's scheduler loop: a far store's HEADs must not stall it. The
    answer that comes late is in the index for the next lookup."""
    writer = S3Tier(seaweed.client(), 1 << 30, prefix=prefix)
    client = S3Client(
        f"http://127.0.0.1:{proxy.port}", seaweed.bucket, "us-east-1", seaweed.credentials
    )
    reader = S3Tier(client, 1 << 30, prefix=prefix, probe_budget_s=0.05)
    writer.put_many([(k, b"chunk") for k in KEYS])  # after the reader listed the bucket
    proxy.mode = "slow-head"
    started = time.monotonic()
    assert reader.contains_many(KEYS) == [False] * 3  # not known within the budget
    assert time.monotonic() - started < 0.25
    time.sleep(0.5)  # the probes' answers arrive
    started = time.monotonic()
    assert reader.contains_many(KEYS) == [True] * 3
    assert time.monotonic() - started < 0.05  # from the index: no round trip
    reader.close()
    writer.close()


def test_an_engine_starts_with_its_object_store_down(seaweed: SeaweedFS, prefix: str) -> None:
    """No store at the address (or no bucket): the tier opens with an empty index, the store
    answers misses and skips writes; an inspection says why instead."""
    dead = S3Client("http://127.0.0.1:9", seaweed.bucket, "us-east-1", seaweed.credentials, 0.5)
    store = TieredStore([MemoryTier(1 << 20), S3Tier(dead, 1 << 30, prefix=prefix)], 16)
    tokens = prompt(11, 2)
    store.put(tokens, NS, chunks_for(11, 2))
    store.flush()
    assert store.lookup(prompt(12, 2), NS).hit_chunks == 0
    assert store.get(tokens, NS).tiers == ["memory", "memory"]
    store.close()
    missing = S3Client(seaweed.endpoint, "no-such-bucket", "us-east-1", seaweed.credentials)
    assert S3Tier(missing, 1 << 30, prefix=prefix).usage().chunks == 0
    with pytest.raises(S3Error, match=r"NoSuchBucket|404"):
        S3Tier(missing, 1 << 30, prefix=prefix, must_list=True)


def test_the_index_is_listed_page_by_page(seaweed: SeaweedFS, prefix: str) -> None:
    client = seaweed.client()
    for i in range(5):
        client.put(f"{prefix}/v1/{i:032x}", b"x" * (i + 1))
    client.put(f"{prefix}/v1/not-a-key", b"ignored")
    listed = list(client.list(f"{prefix}/v1/", page=2))  # three pages
    assert len(listed) == 6
    tier = S3Tier(client, 1 << 30, prefix=prefix)
    assert tier.usage().chunks == 5 and tier.usage().bytes == 15


KEYS = [ChunkKey(bytes([i]) * 16) for i in (1, 2, 3)]


@pytest.mark.parametrize("mode", ["slowdown", "stall"])
def test_a_throttling_or_stalled_store_costs_hits_never_a_request(
    seaweed: SeaweedFS, proxy: FaultProxy, prefix: str, mode: str
) -> None:
    client = S3Client(
        f"http://127.0.0.1:{proxy.port}", seaweed.bucket, "us-east-1", seaweed.credentials, 0.5
    )
    tier = S3Tier(client, 1 << 30, prefix=prefix)
    store = TieredStore([MemoryTier(1 << 20), tier], CHUNK_TOKENS, retry_after_s=0.2)
    before = prompt(5, 2)
    store.put(before, NS, chunks_for(5, 2))
    store.flush()
    store.tiers[0].delete(store.keys(before, NS)[0])  # the hit must come from S3
    assert store.get(before, NS).tiers == ["s3", "memory"]
    store.tiers[0].delete(store.keys(before, NS)[0])
    proxy.mode = mode
    started = time.monotonic()
    assert store.get(before, NS).chunks == []  # a miss: the engine recomputes
    assert store.lookup(prompt(6, 2), NS).hit_chunks == 0
    store.put(prompt(6, 2), NS, chunks_for(6, 2))
    store.flush()
    assert time.monotonic() - started < 3.0  # bounded by the timeout, then the tier rests
    assert store.stats().tiers["s3"].errors >= 1
    proxy.mode = "forward"
    time.sleep(0.3)  # past the retry interval
    assert store.get(before, NS).tiers == ["s3", "memory"]
    store.close()


def test_a_store_killed_mid_run_never_fails_a_request_and_is_used_again(
    seaweed: SeaweedFS, prefix: str
) -> None:
    server = SeaweedFS().start()
    try:
        tier = S3Tier(server.client(timeout_s=0.5), 1 << 30, prefix=prefix)
        store = TieredStore([MemoryTier(1 << 20), tier], CHUNK_TOKENS, retry_after_s=0.2)
        before = prompt(7, 2)
        store.put(before, NS, chunks_for(7, 2))
        store.flush()
        server.kill()
        during = prompt(8, 2)
        store.put(during, NS, chunks_for(8, 2))
        store.flush()
        assert store.lookup(during, NS).hit_chunks == 2  # DRAM keeps serving
        store.tiers[0].close()  # DRAM gone too: the misses must not raise
        assert store.get(before, NS).chunks == []
        assert store.stats().tiers["s3"].errors >= 1
        server.start()
        time.sleep(0.3)
        # What SeaweedFS kept through its SIGKILL reads back verified (it may lose its last
        # writes: a store's durability is its own); the tier is in use again.
        back = store.get(before, NS).chunks
        assert all(same(c, e) for c, e in zip(back, chunks_for(7, 2), strict=False))
        after = prompt(9, 2)
        store.put(after, NS, chunks_for(9, 2))
        store.flush()
        for key in store.keys(after, NS):
            store.tiers[0].delete(key)
        assert store.get(after, NS).tiers == ["s3", "s3"]
        store.close()
    finally:
        server.close()
