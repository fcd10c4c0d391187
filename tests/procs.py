"""Worker processes for the multi-process tests, run as ``python procs.py MODE ...``.

- ``write DIR FIRST COUNT``: put prompts FIRST..FIRST+COUNT-1 (4 chunks each, 256 KiB chunks)
  into a disk tier at DIR, forever if COUNT is 0; prints "ready PID" first.
- ``writers DIR``: for each number FIRST read from stdin, forks a ``write DIR FIRST 0``:
  writers that start in a millisecond, for a test that kills many (a new interpreter spends
  a second importing).
- ``read DIR FIRST COUNT SECONDS``: for SECONDS, read those prompts back from DIR, checking
  every chunk it gets; also rewrites them; prints a JSON summary.
- ``fullput DIR LIMIT``: a store with DRAM + disk under RLIMIT_FSIZE=LIMIT bytes (the disk
  "fills up"); puts a prompt and reports what happened as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from kvtier import KVChunk, TieredStore
from kvtier.tiers import DiskTier, MemoryTier

from kvhelpers import NS, prompt

BIG_SHAPE = (4, 2, 16, 8, 128)  # 256 KiB of float16 per chunk
N_CHUNKS = 4


def big_chunk(seed: int, j: int) -> KVChunk:
    rng = np.random.default_rng(seed * 100 + j)
    return KVChunk.from_array(rng.standard_normal(BIG_SHAPE).astype(np.float16))


def open_store(root: str) -> TieredStore:
    return TieredStore([DiskTier(root, 1 << 34, fsync=True)], chunk_tokens=16)


def write(root: str, first: int, count: int) -> None:
    store = open_store(root)
    print(f"ready {os.getpid()}", flush=True)
    seed = first
    while count == 0 or seed < first + count:
        store.put(prompt(seed, N_CHUNKS), NS, [big_chunk(seed, j) for j in range(N_CHUNKS)])
        seed += 1
    store.close()
    print(json.dumps({"written": seed - first}))


def writers(root: str) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the killed writers are reaped at once
    for line in sys.stdin:
        if os.fork() == 0:
            write(root, int(line), 0)


def read(root: str, first: int, count: int, stop_file: str) -> None:
    """Read (and rename over) the chunks of `count` prompts until `stop_file` exists.

    Says "ready" once its store is open, so the test starts the writers only then; it
    reads on until told to stop, so it reads while every writer runs, however slow the
    host is. A last pass after the stop reads what the writers left.
    """
    store = open_store(root)
    checked = mismatched = 0
    print("ready", flush=True)
    deadline = time.monotonic() + 300  # a lost test must not leave this running forever
    last_pass = False
    while not last_pass:
        last_pass = os.path.exists(stop_file) or time.monotonic() > deadline
        for seed in range(first, first + count):
            tokens = prompt(seed, N_CHUNKS)
            got = store.get(tokens, NS)
            for j, c in enumerate(got.chunks):
                checked += 1
                mismatched += bytes(c.data) != bytes(big_chunk(seed, j).data)
            # Rewrite the same chunks through another file name: rename-over while read.
            store.tiers[0].put_many(
                [
                    (key, blob)
                    for key, blob in zip(
                        store.keys(tokens, NS),
                        store.tiers[0].get_many(store.keys(tokens, NS)),
                        strict=True,
                    )
                    if blob is not None
                ]
            )
    stats = store.stats().tiers["disk"]
    print(
        json.dumps(
            {
                "checked": checked,
                "mismatched": mismatched,
                "corruptions": stats.corruptions,
                "errors": stats.errors,
            }
        )
    )
    store.close()


def fullput(root: str, limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    mem, disk = MemoryTier(1 << 26), DiskTier(root, 1 << 30)
    store = TieredStore([mem, disk], chunk_tokens=16, retry_after_s=60)
    tokens = prompt(1, N_CHUNKS)
    store.put(tokens, NS, [big_chunk(1, j) for j in range(N_CHUNKS)])
    store.flush()
    hit = store.lookup(tokens, NS)
    stats = store.stats().tiers
    print(
        json.dumps(
            {
                "hit_chunks": hit.hit_chunks,
                "tiers": hit.tiers,
                "disk_errors": stats["disk"].errors,
                "disk_dropped": stats["disk"].writes_dropped,
                "disk_written": stats["disk"].chunks_written,
                "temp_files": len(list(Path(root, ".tmp").iterdir())),
            }
        )
    )
    store.close()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "write":
        write(args[0], int(args[1]), int(args[2]))
    elif mode == "writers":
        writers(args[0])
    elif mode == "read":
        read(args[0], int(args[1]), int(args[2]), args[3])
    elif mode == "fullput":
        fullput(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def kvtier_json(*args: str, timeout: float = 900) -> dict[str, Any]:
    """``kvtier ARGS --json`` run as a user runs it (the venv's console script): its JSON."""
    kvtier = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"
    proc = subprocess.run(
        [kvtier, *args, "--json"], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result
