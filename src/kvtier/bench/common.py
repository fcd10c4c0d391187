"""What the engine benchmarks share: the server options every path runs with, and prompts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

# Usage with cached tokens, so that every row says how much was recomputed.
SERVE_OPTIONS = ("--enable-prompt-tokens-details", "--max-model-len", "8192")
NO_PREFIX_CACHE = ("--no-enable-prefix-caching",)


def prompt(kind: str, tokens: int, repeat: int) -> list[int]:
    """Random token ids, distinct for every (kind, length, repeat)."""
    seed = [ord(c) for c in kind] + [tokens, repeat]
    ids: list[int] = np.random.default_rng(seed).integers(100, 40000, size=tokens).tolist()
    return ids


def drop_page_cache() -> bool:
    """Drop the kernel's page cache (root only); False when this process may not."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True
