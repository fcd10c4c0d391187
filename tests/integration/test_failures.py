"""Crashes, corruption, outages, full disks and shared directories: the store never serves a
bad chunk and never makes a request fail."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis

from kvtier import TieredStore
from kvtier.redis_process import RedisServer
from kvtier.tiers import DiskTier, MemoryTier, RedisTier
from kvtier.tiers.base import Tier

from kvhelpers import CHUNK_TOKENS, NS, SHAPE, chunk, chunks_for, prompt, same
from paths import TESTS

PROCS = str(TESTS / "procs.py")


def run_proc(*args: str, timeout: float = 60) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, PROCS, *args], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def test_sigkilled_writer_never_leaves_a_servable_partial_chunk(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from procs import N_CHUNKS, big_chunk

    root = tmp_path / "crash"
    rng = random.Random(1234)
    first, interrupted_writes = 0, 0
    forks = subprocess.Popen(
        [sys.executable, PROCS, "writers", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert forks.stdin is not None and forks.stdout is not None
    try:
        for round_ in range(50):
            forks.stdin.write(f"{first}\n")
            forks.stdin.flush()
            ready, pid = forks.stdout.readline().split()
            assert ready == "ready"
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(int(pid), signal.SIGKILL)
            while Path(f"/proc/{pid}").exists():  # gone once dead (its parent reaps at once)
                time.sleep(0.001)
            interrupted_writes += bool(list((root / ".tmp").iterdir()))
            # Reopen as a new process would: every chunk is either whole and correct, or absent.
            store = TieredStore([DiskTier(root, 1 << 34)], chunk_tokens=CHUNK_TOKENS)
            seed, served = first, 0
            while True:
                got = store.get(prompt(seed, N_CHUNKS), NS)
                if not got.chunks:
                    break
                for j, c in enumerate(got.chunks):
                    assert bytes(c.data) == bytes(big_chunk(seed, j).data), (round_, seed, j)
                served += len(got.chunks)
                seed += 1
            assert store.stats().tiers["disk"].corruptions == 0
            assert list((root / ".tmp").iterdir()) == []  # the dead writer's temp files are gone
            store.close()
            first = seed + 1  # the next writer starts after what is known to be there
    finally:
        forks.kill()
        forks.wait()
    # The kills did land in the middle of writes (a temp file was left behind), often.
    assert interrupted_writes >= 3, interrupted_writes  # about one kill in four
    from kvtier.cli.main import main

    assert main(["inspect", "--disk", str(root), "--verify"]) == 0


@pytest.mark.parametrize("sized", [False, True], ids=["get", "get-sized"])
def test_flipped_bytes_on_disk_are_a_miss_removed_and_counted(tmp_path: Path, sized: bool) -> None:
    tokens = prompt(1, 3)
    with TieredStore([DiskTier(tmp_path, 1 << 30)], CHUNK_TOKENS) as store:
        store.put(tokens, NS, chunks_for(1, 3))
        path = store.tiers[0].path_of(store.keys(tokens, NS)[1])  # type: ignore[attr-defined]
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x01
    path.write_bytes(bytes(raw))
    with TieredStore([DiskTier(tmp_path, 1 << 30)], CHUNK_TOKENS) as store:
        sizes = [chunk(0).nbytes] * 3 if sized else None
        got = store.get(tokens, NS, payload_bytes=sizes)
        assert len(got.chunks) == 1 and same(got.chunks[0], chunk(1000))
        assert store.stats().tiers["disk"].corruptions == 1
        assert not path.exists()
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(3)]
        assert store.get_into(tokens, NS, dests).chunks == 1


def test_flipped_bytes_in_redis_are_a_miss_removed_and_counted(
    redis_server: RedisServer, prefix: str
) -> None:
    tokens = prompt(2, 2)
    tier = RedisTier(redis_server.url, prefix=prefix)
    with TieredStore([tier], CHUNK_TOKENS) as store:
        store.put(tokens, NS, chunks_for(2, 2))
        name = tier.redis_key(store.keys(tokens, NS)[0])
        client = redis.Redis.from_url(redis_server.url)
        value = client.get(name)
        assert isinstance(value, bytes)
        client.setrange(name, 300, bytes([value[300] ^ 0x80]))
        dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(2)]
        assert store.get_into(tokens, NS, dests).chunks == 0
        assert store.stats().tiers["redis"].corruptions == 1
        assert client.exists(name) == 0
        # The same through a sized get, which reads into buffers that become DRAM copies.
        store.put(tokens, NS, chunks_for(2, 2))
        client.setrange(name, 300, bytes([value[300] ^ 0x80]))
        assert store.get(tokens, NS, payload_bytes=[chunk(0).nbytes] * 2).chunks == []
        assert store.stats().tiers["redis"].corruptions == 2
        client.close()


def test_redis_stopped_mid_run_never_raises_and_is_used_again(prefix: str) -> None:
    server = RedisServer().start()
    try:
        tier = RedisTier(server.url, prefix=prefix, timeout_s=0.5)
        store = TieredStore([MemoryTier(1 << 20), tier], CHUNK_TOKENS, retry_after_s=0.1)
        before = prompt(3, 2)
        store.put(before, NS, chunks_for(3, 2))
        store.flush()
        server.stop()
        during = prompt(4, 2)
        store.put(during, NS, chunks_for(4, 2))
        store.flush()
        assert store.lookup(during, NS).hit_chunks == 2  # DRAM keeps serving
        assert store.get(before, NS).tiers == ["memory", "memory"]
        assert store.stats().tiers["redis"].errors >= 1
        store.tiers[0].close()  # DRAM gone too: the remaining misses must not raise
        assert store.lookup(before, NS).hit_chunks == 0
        assert store.get(before, NS).chunks == []
        server.start()
        time.sleep(0.5)  # past the retry interval
        after = prompt(5, 2)
        store.put(after, NS, chunks_for(5, 2))
        store.flush()
        assert tier.contains_many(store.keys(after, NS)) == [True, True]
        store.close()
    finally:
        server.close()


def test_full_disk_skips_the_write_and_keeps_serving_from_dram(tmp_path: Path) -> None:
    result = run_proc("fullput", str(tmp_path), str(100_000))  # each chunk is 256 KiB
    assert result["hit_chunks"] == 4 and result["tiers"] == ["memory"] * 4
    assert result["disk_errors"] == 1 and result["disk_written"] == 0
    assert result["temp_files"] == 0  # the failed write cleaned up after itself


def test_two_processes_share_one_directory_without_torn_reads(tmp_path: Path) -> None:
    root = str(tmp_path / "shared")
    DiskTier(root, 1 << 34)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, PROCS, "read", root, "0", "6", str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
    run_proc("write", root, "0", "6")
    run_proc("write", root, "0", "6")  # rewrite the same chunks while they are being read
    stop.touch()
    out, _ = reader.communicate(timeout=120)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["checked"] >= 6 * 4  # at least the last pass read every chunk
    assert summary["mismatched"] == 0 and summary["corruptions"] == 0
    assert summary["errors"] == 0
    # This process sees everything the others wrote.
    sys.path.insert(0, str(TESTS))
    from procs import big_chunk

    with TieredStore([DiskTier(root, 1 << 34)], CHUNK_TOKENS) as store:
        for seed in range(6):
            got = store.get(prompt(seed, 4), NS)
            assert [bytes(c.data) for c in got.chunks] == [
                bytes(big_chunk(seed, j).data) for j in range(4)
            ]


def test_permission_denied_is_a_skipped_write(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    tiers: list[Tier] = [MemoryTier(1 << 20), DiskTier(root, 1 << 30)]
    with TieredStore(tiers, CHUNK_TOKENS) as store, _unwritable(root / ".tmp"):
        tokens = prompt(6, 1)
        store.put(tokens, NS, chunks_for(6, 1))
        store.flush()
        assert store.stats().tiers["disk"].errors == 1
        assert store.stats().tiers["disk"].chunks_written == 0
        assert store.lookup(tokens, NS).hit_chunks == 1


@contextmanager
def _unwritable(path: Path) -> Iterator[None]:
    """Deny writes in ``path``: chmod for ordinary users; root ignores modes, so for root the
    directory is made immutable (chattr +i), which even root cannot write into."""
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield
        finally:
            path.chmod(0o700)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0
    ):
        pytest.skip("running as root on a filesystem without chattr +i: cannot deny writes")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_disk_failing_part_way_reports_what_it_did(tmp_path: Path) -> None:
    from kvtier.stats import ChunkEvent

    size = chunk(0).nbytes + 96
    disk = DiskTier(tmp_path / "d", 2 * size, fsync=False)
    with TieredStore([MemoryTier(1 << 20), disk], CHUNK_TOKENS, retry_after_s=60) as store:
        events: list[ChunkEvent] = []
        store.subscribe(events.append)
        tokens = prompt(7, 4)
        keys = store.keys(tokens, NS)
        store.put(tokens, NS, chunks_for(7, 2))
        store.flush()
        # The fan-out directory of chunk 3 refuses writes. Chunk 2 lands, evicting chunk 0;
        # chunk 3 evicts chunk 1 to make room, then fails: both evictions are reported.
        blocked = disk.path_of(keys[3]).parent
        assert blocked != disk.path_of(keys[2]).parent, "pick another seed"
        blocked.mkdir(exist_ok=True)
        with _unwritable(blocked):
            store.put(tokens, NS, chunks_for(7, 4)[2:], start_chunk=2)
            store.flush()
        stats = store.stats().tiers["disk"]
        assert (stats.chunks_written, stats.evictions, stats.errors) == (3, 2, 1)
        assert stats.writes_dropped == 1
        disk_events = [(e.kind, e.keys) for e in events if e.tier == "disk"]
        assert ("evicted", (keys[0], keys[1])) in disk_events
        assert ("stored", (keys[2],)) in disk_events
        assert disk.contains_many(keys) == [False, False, True, False]
        assert disk.usage().chunks == 1 and disk.usage().bytes == size


def test_redis_connection_dropped_while_idle_is_not_an_outage(prefix: str) -> None:
    with RedisServer() as server:
        tier = RedisTier(server.url, prefix=prefix)
        with TieredStore([tier], CHUNK_TOKENS) as store:
            tokens = prompt(8, 2)
            store.put(tokens, NS, chunks_for(8, 2))
            dests = [np.zeros(SHAPE, dtype=np.float16) for _ in range(2)]
            assert store.get_into(tokens, NS, dests).chunks == 2
            client = redis.Redis.from_url(server.url)
            client.config_set("timeout", 1)  # the server drops idle clients after 1 s
            client.close()
            time.sleep(2.2)
            assert store.get_into(tokens, NS, dests).chunks == 2
            assert store.stats().tiers["redis"].errors == 0


def test_a_listener_that_flushes_does_not_deadlock(tmp_path: Path) -> None:
    with TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 30)], CHUNK_TOKENS) as store:
        results: list[bool] = []
        store.subscribe(
            lambda e: results.append(store.flush(timeout=5)) if e.tier == "disk" else None
        )
        store.put(prompt(9, 1), NS, chunks_for(9, 1))
        assert store.flush(timeout=10)
        assert results == [False]  # the worker cannot wait for itself; it said so at once
