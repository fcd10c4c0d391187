"""A get that hands each chunk on as soon as it is read (kvtier.results.OnRead): once per
verified chunk, on the caller's pool, all before the get returns; the run it returns is still
the leading verified one. With an ``io`` pool, chunks below DRAM are read there and verified
and handed on on the pool."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kvtier.chunk import KVChunk
from kvtier.keys import Namespace
from kvtier.results import OnRead
from kvtier.store import TieredStore
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier

NS = Namespace("m", kv_dtype="float32")
CHUNK = 16


def stored(tmp_path: Path, chunks: int, in_dram: int) -> tuple[TieredStore, list[int], int]:
    """A store whose chunk c holds the value c, the first ``in_dram`` of them also in DRAM, the
    rest on disk only: (store, tokens, a chunk's KV bytes)."""
    tokens = list(range(chunks * CHUNK))
    kv = [np.full((2, 2, CHUNK, 2, 8), c, dtype=np.float32) for c in range(chunks)]
    s = TieredStore([MemoryTier(1 << 26), DiskTier(tmp_path, 1 << 30)], CHUNK)
    s.put(tokens, NS, [KVChunk.from_array(a) for a in kv])
    s.flush()
    for key in s.keys(tokens, NS)[in_dram:]:
        s.tiers[0].delete(key)
    return s, tokens, kv[0].nbytes


@pytest.mark.parametrize("io", [False, True])
def test_each_chunk_is_handed_on_once_from_the_pool_before_the_get_returns(
    tmp_path: Path, io: bool
) -> None:
    s, tokens, nbytes = stored(tmp_path, 6, in_dram=2)  # chunks 2-5 on disk only
    with s:
        keys = s.keys(tokens, NS)
        disk = s.tiers[1]
        readers: set[str] = set()
        read_into_many = disk.read_into_many

        def reading(items: object) -> object:
            readers.add(threading.current_thread().name)
            return read_into_many(items)  # type: ignore[arg-type]

        disk.read_into_many = reading  # type: ignore[method-assign, assignment]
        path = disk.path_of(keys[3])  # type: ignore[attr-defined]
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))  # chunk 3 fails its checksum: the run ends there
        handed: dict[int, float] = {}
        threads: set[str] = set()
        lock = threading.Lock()

        def call(j: int, chunk: KVChunk, check: object) -> None:
            assert check is None  # verified by the store (check_payload)
            with lock:
                assert j not in handed
                handed[j] = float(np.frombuffer(chunk.data, np.float32)[0])
                threads.add(threading.current_thread().name)

        with ThreadPoolExecutor(3, "handing") as pool, ThreadPoolExecutor(2, "io") as reads:
            on_read = OnRead(call, pool, reads if io else None)
            got = s.get(tokens, NS, payload_bytes=[nbytes] * 6, on_read=on_read)
        assert got.tiers == ["memory", "memory", "disk"]
        assert set(handed) == {0, 1, 2, 4, 5}  # the corrupt chunk is not; those after it are
        assert all(v == j for j, v in handed.items())  # each chunk's own KV
        assert threads and all(t.startswith("handing") for t in threads)
        assert readers and all(t.startswith("io" if io else "handing") for t in readers)
        assert s.stats().tiers["disk"].read_seconds > 0


def test_a_stored_form_is_cut_to_its_size_where_it_lies_or_copied_while_viewed() -> None:
    from kvtier import codec
    from kvtier.sized_reads import _cut

    buf = codec.SealedChunk(1 << 20)
    buf[:5] = b"chunk"
    assert _cut(buf, 5) is buf and bytes(buf) == b"chunk"  # in place: no copy, no new memory
    held = codec.SealedChunk(1 << 20)
    held[:5] = b"chunk"
    view = memoryview(held)  # something still reads it: a copy, the buffer left whole
    copied = _cut(held, 5)
    assert copied is not held and bytes(copied) == b"chunk" and len(held) == 1 << 20
    view.release()


@pytest.mark.parametrize("io", [False, True])
def test_a_call_that_raises_fails_the_get_after_every_other_call_has_ended(
    tmp_path: Path, io: bool
) -> None:
    s, tokens, nbytes = stored(tmp_path, 4, in_dram=0)
    with s:
        ended: list[int] = []

        def call(j: int, chunk: KVChunk, check: object) -> None:
            if j == 0:
                raise RuntimeError("placing chunk 0 failed")
            threading.Event().wait(0.05)
            ended.append(j)

        with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(2) as reads:
            try:
                on_read = OnRead(call, pool, reads if io else None)
                s.get(tokens, NS, payload_bytes=[nbytes] * 4, on_read=on_read)
            except RuntimeError:
                assert sorted(ended) == [1, 2, 3]  # none still running, so none writes later
            else:
                raise AssertionError("the call's error did not reach the caller")
