"""Chunk keys are the same in every process, whatever its hash seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Pinned values: if these change, every stored chunk everywhere becomes unreachable. Change
# them only together with KEY_SCHEME_VERSION and a note in the changelog.
PINNED_ROOT = "2f45674e3bf43159e12dbb1701505897"
PINNED_KEYS = ["938a78f505f955cd094d8789bd7f0e8a", "16da4c1fe86e80eb47ce56042a7dd99d"]


def test_keys_are_identical_in_processes_with_different_hash_seeds() -> None:
    code = (
        "import json; from kvtier.keys import Namespace, chunk_keys;"
        "print(json.dumps([k.hex() for k in chunk_keys(list(range(1024)),"
        " Namespace('m', tenant_salt='s'), 256)]))"
    )
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        outputs.add(out)
    assert len(outputs) == 1
    assert len(json.loads(outputs.pop())) == 4
