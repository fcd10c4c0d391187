"""O_DIRECT writes and reads (kvtier.tiers.direct_io), the disk tier's and the raw baseline's:
any length, in aligned pieces, and the file exactly the data."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from kvtier.bench import raw_io
from kvtier.tiers import direct_io

PIECE = 3 * direct_io.ALIGN  # small pieces: several per file


def aligned(nbytes: int) -> memoryview:
    return memoryview(mmap.mmap(-1, nbytes))


@pytest.mark.parametrize("size", [1, direct_io.ALIGN - 1, direct_io.ALIGN, 7 * direct_io.ALIGN + 5])
def test_a_direct_write_reads_back_whole_and_leaves_no_padding(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "chunk"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if direct_io.enable(fd) is None:
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        direct_io.write_from(fd, memoryview(data), aligned(PIECE))
        assert os.fstat(fd).st_size == size  # cut back from the padded last piece
        halves = [memoryview(bytearray(size // 2)), memoryview(bytearray(size - size // 2))]
        assert direct_io.read_into(fd, halves, aligned(PIECE))
    finally:
        os.close(fd)
    assert b"".join(bytes(h) for h in halves) == data == path.read_bytes()
    # Buffers longer than the file: the file changed under the reader.
    fd = os.open(path, os.O_RDONLY)
    try:
        direct_io.enable(fd)
        assert not direct_io.read_into(fd, [memoryview(bytearray(size + 1))], aligned(PIECE))
    finally:
        os.close(fd)


def test_the_raw_baseline_writes_what_it_is_given(tmp_path: Path) -> None:
    payloads = [np.arange(n, dtype=np.uint8) for n in (5, direct_io.ALIGN, 3 << 20)]
    paths = [tmp_path / f"raw{i}" for i in range(len(payloads))]
    raw_io.write_direct(paths, payloads, fsync=True)
    assert [p.read_bytes() for p in paths] == [p.tobytes() for p in payloads]
