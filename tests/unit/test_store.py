"""TieredStore: lookup, get, get_into, put with write-behind, promotion, prefetch, pins,
stats and events, over real tiers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from kvtier import Namespace, TieredStore, codec
from kvtier.codec import Compression
from kvtier.stats import ChunkEvent
from kvtier.tiers import DiskTier, MemoryTier

from kvhelpers import CHUNK_TOKENS, NS, SHAPE, chunk, chunks_for, prompt, same

CHUNK_BYTES = chunk(0).nbytes


def two_tier(tmp_path: Path, mem_chunks: int = 100, **kw: object) -> TieredStore:
    mem = MemoryTier(mem_chunks * (CHUNK_BYTES + 96))
    disk = DiskTier(tmp_path / "disk", 1 << 30, fsync=False)
    return TieredStore([mem, disk], chunk_tokens=CHUNK_TOKENS, **kw)  # type: ignore[arg-type]


def test_put_then_lookup_and_get_return_the_same_kv(tmp_path: Path) -> None:
    with two_tier(tmp_path) as store:
        tokens = prompt(1, 4, extra=5)
        report = store.put(tokens, NS, chunks_for(1, 4))
        assert (report.new_chunks, report.queued, report.dropped) == (4, 4, 0)
        hit = store.lookup(tokens, NS)
        assert hit.hit_tokens == 4 * CHUNK_TOKENS and hit.tiers == ["memory"] * 4
        got = store.get(tokens, NS)
        assert got.tiers == ["memory"] * 4
        assert all(same(a, b) for a, b in zip(got.chunks, chunks_for(1, 4), strict=True))
        # A longer prompt sharing the prefix hits the prefix only.
        longer = tokens[: 4 * CHUNK_TOKENS] + prompt(2, 3)
        assert store.lookup(longer, NS).hit_chunks == 4
        # Another namespace (tenant salt) shares nothing.
        salted = Namespace(NS.model, NS.model_revision, NS.kv_dtype, tenant_salt="tenant-b")
        assert store.lookup(tokens, salted).hit_chunks == 0


def test_put_again_writes_nothing_new(tmp_path: Path) -> None:
    with two_tier(tmp_path) as store:
        tokens = prompt(1, 3)
        store.put(tokens, NS, chunks_for(1, 3))
        assert store.put(tokens, NS, chunks_for(1, 3)).new_chunks == 0
        store.put(tokens, NS, chunks_for(1, 3)[1:], start_chunk=1)
        store.flush()
        assert store.stats().tiers["disk"].chunks_written == 3


def test_write_behind_reaches_lower_tiers_and_get_promotes(tmp_path: Path) -> None:
    with two_tier(tmp_path) as store:
        tokens = prompt(3, 3)
        store.put(tokens, NS, chunks_for(3, 3))
        assert store.flush(timeout=10)
        disk = store.tiers[1]
        assert disk.contains_many(store.keys(tokens, NS)) == [True] * 3
    # A new process: DRAM is empty, the disk still has everything.
    with two_tier(tmp_path) as store:
        assert store.lookup(tokens, NS).tiers == ["disk"] * 3
        got = store.get(tokens, NS)
        assert got.tiers == ["disk"] * 3
        assert all(same(a, b) for a, b in zip(got.chunks, chunks_for(3, 3), strict=True))
        assert store.lookup(tokens, NS).tiers == ["memory"] * 3  # promoted


def test_get_into_loads_straight_into_buffers_from_any_tier(tmp_path: Path) -> None:
    tokens = prompt(4, 3)
    with two_tier(tmp_path) as store:
        store.put(tokens, NS, chunks_for(4, 3))
        store.flush()
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(3)]
        loaded = store.get_into(tokens, NS, dests)
        assert loaded.chunks == 3 and loaded.tiers == ["memory"] * 3
        assert all(
            np.array_equal(d, c.numpy()) for d, c in zip(dests, chunks_for(4, 3), strict=True)
        )
    with two_tier(tmp_path) as store:
        # Promotions into DRAM go into buffers given by use_blanks while it has them.
        spare = [codec.SealedChunk(96 + CHUNK_BYTES)]
        store.use_blanks(lambda n: spare.pop() if spare and len(spare[-1]) == n else None)
        given = spare[0]
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(2)]
        loaded = store.get_into(tokens, NS, dests, start_chunk=1)
        assert loaded.tiers == ["disk", "disk"]
        assert np.array_equal(dests[1], chunk(4002).numpy())
        assert store.lookup(tokens, NS).tiers[1:] == ["memory", "memory"]
        keys = store.keys(tokens, NS)
        held = store.tiers[0].get_many(keys[1:])
        assert sum(blob is given for blob in held) == 1 and not spare
        assert all(
            b is not None and same(codec.decode(b).chunk, chunk(4001 + i))
            for i, b in enumerate(held)
        )
        with pytest.raises(ValueError, match="writable"):
            store.get_into(tokens, NS, [bytes(CHUNK_BYTES)])


def test_get_with_sizes_reads_into_buffers_that_become_the_dram_copies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = prompt(4, 3)
    sizes = [CHUNK_BYTES] * 3
    with two_tier(tmp_path) as store:
        store.put(tokens, NS, chunks_for(4, 3))
        store.flush()
    with two_tier(tmp_path) as store:
        spare = [codec.SealedChunk(96 + CHUNK_BYTES)]
        store.use_blanks(lambda n: spare.pop() if spare and len(spare[-1]) == n else None)
        given = spare[0]
        got = store.get(tokens, NS, payload_bytes=sizes)
        assert got.tiers == ["disk"] * 3 and not spare
        assert all(same(a, b) for a, b in zip(got.chunks, chunks_for(4, 3), strict=True))
        # What was read is what DRAM now holds (no copy), the first from the blank given.
        held = store.tiers[0].get_many(store.keys(tokens, NS))
        owners = [memoryview(c.data).obj for c in got.chunks]
        assert all(o is h for o, h in zip(owners, held, strict=True)) and held[0] is given
        again = store.get(tokens, NS, payload_bytes=sizes)  # from DRAM: views of the same
        assert again.tiers == ["memory"] * 3
        assert all(memoryview(c.data).obj is h for c, h in zip(again.chunks, held, strict=True))
        # A chunk of another size than the caller's ends the run, with a warning.
        for where in ("memory", "disk"):
            assert store.lookup(tokens, NS).tiers[1] == where
            short = store.get(tokens, NS, payload_bytes=[CHUNK_BYTES, CHUNK_BYTES - 2])
            assert short.tiers == ["memory"]
            store.tiers[0].delete(store.keys(tokens, NS)[1])  # on disk only, next time
        # DRAM, then the copy on disk below it, then the disk copy alone
        assert sum("were expected" in r.getMessage() for r in caplog.records) == 3


def test_compressed_lower_tier_round_trips(tmp_path: Path) -> None:
    mem = MemoryTier(1 << 20)
    disk = DiskTier(tmp_path / "z", 1 << 30, fsync=False)
    tokens = prompt(5, 2)
    comps = [Compression.NONE, Compression.ZSTD]
    with TieredStore([mem, disk], CHUNK_TOKENS, compression=comps) as store:
        store.put(tokens, NS, chunks_for(5, 2))
        store.flush()
    disk2 = DiskTier(tmp_path / "z", 1 << 30)
    with TieredStore([MemoryTier(1 << 20), disk2], CHUNK_TOKENS, compression=comps) as store:
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(2)]
        assert store.get_into(tokens, NS, dests).chunks == 2
        assert np.array_equal(dests[0], chunk(5000).numpy())
        assert same(store.get(tokens, NS).chunks[1], chunk(5001))
    disk3 = DiskTier(tmp_path / "z", 1 << 30)
    with TieredStore([MemoryTier(1 << 20), disk3], CHUNK_TOKENS, compression=comps) as store:
        got = store.get(tokens, NS, payload_bytes=[CHUNK_BYTES] * 2)  # fits no buffer: read whole
        assert got.tiers == ["disk"] * 2 and same(got.chunks[1], chunk(5001))
        held = store.tiers[0].get_many(store.keys(tokens, NS))
        assert all(codec.read_header(b).compression == Compression.NONE for b in held)  # type: ignore[arg-type]
        assert same(store.get(tokens, NS).chunks[0], chunk(5000))


@pytest.mark.parametrize("lossy", [Compression.INT8, Compression.INT4])
def test_a_lossy_lower_tier_stores_fewer_bytes_and_promotes_raw(
    tmp_path: Path, lossy: Compression
) -> None:
    """DRAM raw over a disk tier storing int8 (or int4): the disk files are smaller, a fresh
    store reads them back close to the original, DRAM then holds them raw."""
    tokens = prompt(6, 2)
    comps = [Compression.NONE, lossy]
    with TieredStore(
        [MemoryTier(1 << 20), DiskTier(tmp_path / "q", 1 << 30, fsync=False)],
        CHUNK_TOKENS,
        compression=comps,
    ) as store:
        store.put(tokens, NS, chunks_for(6, 2))
        store.flush()
    files = sorted((tmp_path / "q").rglob("*.kvc"))
    # (head dim 8 here: a scale per 8 values costs more than at 64 or 128)
    assert len(files) == 2 and all(f.stat().st_size < 96 + CHUNK_BYTES * 0.7 for f in files)
    disk = DiskTier(tmp_path / "q", 1 << 30)
    with TieredStore([MemoryTier(1 << 20), disk], CHUNK_TOKENS, compression=comps) as store:
        got = store.get(tokens, NS, payload_bytes=[CHUNK_BYTES] * 2)
        assert got.tiers == ["disk"] * 2
        for c, original in zip(got.chunks, chunks_for(6, 2), strict=True):
            a, b = c.numpy().astype(np.float32), original.numpy().astype(np.float32)
            assert c.shape == original.shape and c.dtype == original.dtype
            bound = 0.02 if lossy == Compression.INT8 else 0.2
            assert np.abs(a - b).max() / np.abs(b).max() < bound
            assert not np.array_equal(a, b)  # lossy: these are not the bytes put
        held = store.tiers[0].get_many(store.keys(tokens, NS))
        assert all(codec.read_header(b).compression == Compression.NONE for b in held)  # type: ignore[arg-type]
    # a load into raw-sized buffers decodes the smaller files read into their front
    disk = DiskTier(tmp_path / "q", 1 << 30)
    with TieredStore([MemoryTier(1 << 20), disk], CHUNK_TOKENS, compression=comps) as store:
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(2)]
        assert store.get_into(tokens, NS, dests).tiers == ["disk"] * 2
        assert all(np.array_equal(d, c.numpy()) for d, c in zip(dests, got.chunks, strict=True))


def test_corrupt_copy_in_dram_falls_back_to_the_good_copy_on_disk(tmp_path: Path) -> None:
    with two_tier(tmp_path) as store:
        tokens = prompt(6, 2)
        store.put(tokens, NS, chunks_for(6, 2))
        store.flush()
        mem: MemoryTier = store.tiers[0]  # type: ignore[assignment]
        key = store.keys(tokens, NS)[0]
        damaged = bytearray(mem._data[key])
        damaged[200] ^= 0xFF
        mem._data[key] = bytes(damaged)  # a bit flip in DRAM
        events: list[ChunkEvent] = []
        store.subscribe(events.append)
        got = store.get(tokens, NS)
        assert got.tiers == ["disk", "memory"]
        assert same(got.chunks[0], chunk(6000))
        stats = store.stats().tiers["memory"]
        assert stats.corruptions == 1
        assert ChunkEvent("removed", "memory", (key,)) in events


def test_full_write_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    with two_tier(tmp_path, write_queue=1) as store:
        tokens = prompt(7, 10)
        report = store.put(tokens, NS, chunks_for(7, 10))
        assert report.dropped == 9 and report.queued == 1
        store.flush()
        assert store.stats().tiers["disk"].writes_dropped == 9
        assert store.lookup(tokens, NS).hit_chunks == 10  # still in DRAM


def test_prefetch_promotes_ahead_of_need(tmp_path: Path) -> None:
    tokens = prompt(8, 4, extra=3)
    with two_tier(tmp_path) as store:
        store.put(tokens, NS, chunks_for(8, 4))
    with two_tier(tmp_path) as store:
        assert store.lookup(tokens, NS).tiers == ["disk"] * 4
        assert store.prefetch(tokens, NS).result(timeout=10) == 4 * CHUNK_TOKENS
        assert store.lookup(tokens, NS).tiers == ["memory"] * 4


def test_a_sized_prefetch_of_quantized_chunks_promotes_them_raw(tmp_path: Path) -> None:
    """A prefetch told the chunks' KV size (as the engine's worker tells it) reads each int8
    chunk into the front of its DRAM copy and decodes it there: DRAM then holds the chunks
    raw, the KV a direct load from disk gives."""
    tokens = prompt(9, 3)
    comps = [Compression.NONE, Compression.INT8]

    def store() -> TieredStore:
        disk = DiskTier(tmp_path / "q", 1 << 30, fsync=False)
        return TieredStore([MemoryTier(1 << 20), disk], CHUNK_TOKENS, compression=comps)

    with store() as s:
        s.put(tokens, NS, chunks_for(9, 3))
    with store() as s:
        direct = [
            c.numpy().copy() for c in s.get(tokens, NS, payload_bytes=[CHUNK_BYTES] * 3).chunks
        ]
    with store() as s:
        assert s.prefetch(tokens, NS, CHUNK_BYTES).result(timeout=10) == 3 * CHUNK_TOKENS
        assert s.lookup(tokens, NS).tiers == ["memory"] * 3
        held = s.tiers[0].get_many(s.keys(tokens, NS))
        assert all(codec.read_header(b).compression == Compression.NONE for b in held)  # type: ignore[arg-type]
        got = s.get(tokens, NS)
        assert got.tiers == ["memory"] * 3
        assert all(np.array_equal(c.numpy(), d) for c, d in zip(got.chunks, direct, strict=True))


def test_pinned_chunks_survive_pressure_and_evictions_are_reported(tmp_path: Path) -> None:
    with two_tier(tmp_path, mem_chunks=2) as store:
        events: list[ChunkEvent] = []
        store.subscribe(events.append)
        a, b = prompt(9, 2), prompt(10, 2)
        store.put(a, NS, chunks_for(9, 2))
        keys_a = store.keys(a, NS)
        with store.pinned(keys_a):
            store.put(b, NS, chunks_for(10, 2))
            assert store.tiers[0].contains_many(keys_a) == [True, True]
            assert store.stats().tiers["memory"].writes_rejected == 2
        store.put(b, NS, chunks_for(10, 2))  # now A's chunks may go, oldest first
        evicted = [k for e in events if e.kind == "evicted" and e.tier == "memory" for k in e.keys]
        assert evicted == keys_a
        assert store.stats().tiers["memory"].evictions == 2
        stored = [e for e in events if e.kind == "stored" and e.tier == "memory"]
        assert stored[0].keys == tuple(keys_a)


def test_stats_count_hits_misses_and_bytes(tmp_path: Path) -> None:
    with two_tier(tmp_path) as store:
        tokens = prompt(11, 2)
        store.lookup(tokens, NS)
        store.put(tokens, NS, chunks_for(11, 2))
        store.get(tokens, NS)
        s = store.stats()
        assert s.lookups == 1 and s.lookup_tokens == 32 and s.hit_tokens == 0
        mem = s.tiers["memory"]
        assert mem.hits == 2 and mem.misses == 2 and mem.chunks_written == 2
        assert mem.bytes_read == mem.bytes_written == 2 * (CHUNK_BYTES + 96)
        assert s.as_dict()["tiers"]["memory"]["hits"] == 2  # type: ignore[index]


def test_each_tier_counts_its_stored_bytes_and_logical_tokens(tmp_path: Path) -> None:
    """DRAM raw over an int8 disk tier: both hold the same tokens (a tail's too), the disk
    in fewer bytes; the counters give each tier's stored / raw ratio."""
    comps = [Compression.NONE, Compression.INT8]
    disk = DiskTier(tmp_path / "q", 1 << 30, fsync=False)
    with TieredStore([MemoryTier(1 << 20), disk], CHUNK_TOKENS, compression=comps) as store:
        assert "tokens" not in store.tier_states()["disk"]  # nothing written yet: unknown
        tokens = prompt(12, 2, extra=8)  # two whole chunks and a tail of 8 tokens
        chunks = [*chunks_for(12, 2), chunk(12002, (*SHAPE[:2], 8, *SHAPE[3:]))]
        store.put(tokens, NS, chunks, tail=True)
        store.flush()
        states, stats = store.tier_states(), store.stats().tiers
        for tier in ("memory", "disk"):
            assert states[tier]["tokens"] == 2 * CHUNK_TOKENS + 8, states
            assert stats[tier].tokens_written == 2 * CHUNK_TOKENS + 8
            assert stats[tier].raw_bytes_written == stats["memory"].bytes_written
        assert stats["memory"].bytes_written == states["memory"]["used_bytes"]
        ratio = stats["disk"].bytes_written / stats["disk"].raw_bytes_written
        assert 0.4 < ratio < 0.7, ratio  # int8 over fp16 with head dim 8 here


def sealed(store: TieredStore, tokens: list[int], seed: int, n: int) -> list[codec.SealedChunk]:
    """Chunks encoded in place, as the vLLM connector builds them."""
    blobs = []
    for key, kv in zip(store.keys(tokens, NS), chunks_for(seed, n), strict=False):
        blob = codec.blank(key, kv.dtype, kv.shape, NS.id(CHUNK_TOKENS))
        codec.payload_of(blob)[:] = memoryview(kv.data).cast("B")
        blobs.append(codec.seal(blob))
    return blobs


def test_put_encoded_keeps_sealed_chunks_in_dram_without_a_copy(tmp_path: Path) -> None:
    tokens = prompt(6, 3)
    with two_tier(tmp_path) as store:
        blobs = sealed(store, tokens, 6, 3)
        assert store.put_encoded(tokens, NS, blobs[1:], start_chunk=1).new_chunks == 2
        assert store.put_encoded(tokens, NS, blobs).new_chunks == 1  # only chunk 0 was new
        keys = store.keys(tokens, NS)
        assert all(a is b for a, b in zip(store.tiers[0].get_many(keys), blobs, strict=True))
        assert store.flush(timeout=10)
    with two_tier(tmp_path) as store:  # the disk got the same bytes
        got = store.get(tokens, NS)
        assert got.tiers == ["disk"] * 3
        assert all(same(a, b) for a, b in zip(got.chunks, chunks_for(6, 3), strict=True))


def test_put_encoded_refuses_a_chunk_encoded_under_another_key(tmp_path: Path) -> None:
    tokens = prompt(7, 2)
    with two_tier(tmp_path) as store:
        blobs = sealed(store, tokens, 7, 2)
        with pytest.raises(ValueError, match="chunk 0 was encoded under another key"):
            store.put_encoded(tokens, NS, blobs[::-1])
        with pytest.raises(ValueError, match="tokens"):
            store.put_encoded(tokens[:CHUNK_TOKENS], NS, blobs)
        assert store.lookup(tokens, NS).hit_chunks == 0


def test_bad_put_arguments_are_rejected(tmp_path: Path) -> None:
    with two_tier(tmp_path) as store:
        with pytest.raises(ValueError, match="tokens"):
            store.put(prompt(1, 1), NS, chunks_for(1, 2))
        with pytest.raises(ValueError, match="holds 32 tokens"):
            store.put(prompt(1, 2), NS, [chunk(1, (2, 2, 32, 2, 8))])
    with pytest.raises(ValueError, match="unique"):
        TieredStore([MemoryTier(100), MemoryTier(100)])


def test_unwritable_disk_degrades_to_skipped_writes_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with two_tier(tmp_path, retry_after_s=0.05) as store:
        disk: DiskTier = store.tiers[1]  # type: ignore[assignment]
        moved = tmp_path / "moved"
        disk.root.rename(moved)
        disk.root.write_text("not a directory any more")  # every write fails: ENOTDIR
        caplog.set_level(logging.WARNING, logger="kvtier")
        tokens = prompt(12, 2)
        store.put(tokens, NS, chunks_for(12, 2))
        store.flush()
        assert store.lookup(tokens, NS).hit_chunks == 2  # served from DRAM
        assert store.get(tokens, NS).tiers == ["memory", "memory"]
        assert store.stats().tiers["disk"].errors >= 1
        warnings = [r for r in caplog.records if "disk" in r.getMessage()]
        assert len([r for r in warnings if "failed" in r.getMessage()]) == 1
        # The directory comes back: after the retry interval the disk is used again.
        disk.root.unlink()
        moved.rename(disk.root)
        import time

        time.sleep(0.1)
        more = prompt(13, 2)
        store.put(more, NS, chunks_for(13, 2))
        store.flush()
        assert disk.contains_many(store.keys(more, NS)) == [True, True]
        assert any("recovered" in r.getMessage() for r in caplog.records)


def test_lookup_counts_chunks_another_process_holds(tmp_path: Path) -> None:
    with two_tier(tmp_path) as store:
        tokens = prompt(15, 4)
        store.put(tokens, NS, chunks_for(15, 1))  # chunk 0 here
        keys = store.keys(tokens, NS)
        hit = store.lookup(tokens, NS, held_elsewhere={keys[1], keys[2]})
        assert hit.tiers == ["memory", "elsewhere", "elsewhere"]
        assert store.lookup(tokens, NS).hit_chunks == 1


def test_a_tail_of_whole_blocks_is_stored_found_and_loaded_from_any_tier(tmp_path: Path) -> None:
    block = 4  # the engine's block: tails are whole blocks after the last full chunk
    tail_shape = (*SHAPE[:2], 3 * block, *SHAPE[3:])
    with two_tier(tmp_path) as store:
        tokens = prompt(5, 2, extra=14)  # 2 chunks, 14 more tokens: a tail of 12 is usable
        chunks = chunks_for(5, 2)
        tail = chunk(77, tail_shape)
        store.put(tokens, NS, chunks)
        assert store.lookup(tokens, NS, granule=block).hit_tokens == 2 * CHUNK_TOKENS
        stored = tokens[: 2 * CHUNK_TOKENS + 3 * block]
        store.put(stored, NS, [tail], start_chunk=2, tail=True)
        hit = store.lookup(tokens, NS, granule=block)
        assert hit.hit_tokens == 2 * CHUNK_TOKENS + 12 and hit.tail_tokens == 12
        assert hit.tiers == ["memory"] * 3 and hit.hit_chunks == 3
        assert store.lookup(tokens, NS).hit_tokens == 2 * CHUNK_TOKENS  # tails only if asked
        # A prompt that diverges inside the tail's blocks finds the shorter tails only.
        other = [*stored[:-5], 1, 2, 3, 4, 5]
        assert store.lookup(other, NS, granule=block).hit_tokens == 2 * CHUNK_TOKENS
        # A prompt that grows past the tail: the tail still counts, full chunks come first.
        grown = stored + prompt(9, 1)
        assert store.lookup(grown, NS, granule=block).hit_tokens == 2 * CHUNK_TOKENS + 12
        store.flush()
        store.tiers[0].delete(store.keys(stored, NS, tail=True)[2])  # only on disk now
        dests = [np.empty(SHAPE, np.float16) for _ in range(2)] + [np.empty(tail_shape, np.float16)]
        loaded = store.get_into(stored, NS, dests, tail=True)
        assert loaded.chunks == 3 and loaded.tiers == ["memory", "memory", "disk"]
        assert dests[2].tobytes() == bytes(tail.data)
        got = store.get(stored, NS, start_chunk=2, tail=True)
        assert got.tiers == ["memory"] and same(got.chunks[0], tail)  # promoted by get_into
        with pytest.raises(ValueError, match="tail 2 holds 8 tokens, it must hold 12"):
            store.put(stored, NS, [chunk(1, (*SHAPE[:2], 8, *SHAPE[3:]))], 2, tail=True)


def test_kv_of_one_dtype_is_never_served_as_another(tmp_path: Path) -> None:
    """One disk directory shared by a bf16 engine and an fp32 one (a pod whose hosts picked
    different dtypes, or a server restarted with another --dtype): each reads back only its own
    chunks, in its own dtype, for the same tokens."""
    bf16 = Namespace("m", "r1", "bfloat16")
    fp32 = Namespace("m", "r1", "float32")
    tokens = prompt(9, 3)
    rng = np.random.default_rng(9)
    values = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    as_fp32 = [codec.KVChunk.from_array(v) for v in values]
    as_bf16 = [
        codec.KVChunk.from_array((v.view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
        for v in values
    ]
    root = tmp_path / "shared"
    with TieredStore([DiskTier(root, 1 << 30, fsync=False)], CHUNK_TOKENS) as store:
        store.put(tokens, bf16, as_bf16)
        assert store.lookup(tokens, fp32).hit_chunks == 0  # not before fp32 KV is stored
        assert store.lookup(tokens, bf16).hit_chunks == 3
        store.put(tokens, fp32, as_fp32)
    with TieredStore([DiskTier(root, 1 << 30, fsync=False)], CHUNK_TOKENS) as store:
        for ns, want in ((bf16, as_bf16), (fp32, as_fp32)):
            got = store.get(tokens, ns)
            assert len(got.chunks) == 3 and all(c.dtype == ns.kv_dtype for c in got.chunks)
            assert all(same(a, b) for a, b in zip(got.chunks, want, strict=True))
        assert store.stats().tiers["disk"].corruptions == 0
