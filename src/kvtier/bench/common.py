"""What the engine benchmarks share: the server options every path runs with, prompts,
copying one tier's chunks into another, picking a raw medium's items the size of a hit."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from kvtier.tiers import Tier
    from kvtier.tiers.base import Blob

# Usage with cached tokens, so that every row says how much was recomputed.
SERVE_OPTIONS = ("--enable-prompt-tokens-details", "--max-model-len", "8192")
NO_PREFIX_CACHE = ("--no-enable-prefix-caching",)
T = TypeVar("T")


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


def copy_chunks(source: Tier, dest: Tier, convert: Callable[[Blob], Blob] | None = None) -> None:
    """Every chunk of ``source`` into ``dest`` (each value through ``convert`` when given),
    16 at a time; then both tiers closed."""
    try:
        keys = list(source.scan())
        for start in range(0, len(keys), 16):
            batch = keys[start : start + 16]
            values = source.get_many(batch)
            dest.put_many(
                [
                    (k, convert(v) if convert else v)
                    for k, v in zip(batch, values, strict=True)
                    if v is not None
                ]
            )
    finally:
        source.close()
        dest.close()


def same_bytes(items: list[tuple[T, int]], loaded: int | None, chunk_tokens: int = 256) -> list[T]:
    """Items (files, Redis keys) as many and as large as the chunks of a hit of ``loaded``
    tokens: whole chunks are the largest items; a tail, the item nearest its share of one."""
    if not items or not loaded:
        return []
    full = max(size for _, size in items)
    whole = [item for item, size in items if size == full]
    picked = whole[: loaded // chunk_tokens]
    if loaded % chunk_tokens:
        share = full * (loaded % chunk_tokens) // chunk_tokens
        rest = [(abs(size - share), i) for i, (_, size) in enumerate(items) if size < full]
        if rest:
            picked.append(items[min(rest)[1]][0])
    return picked
