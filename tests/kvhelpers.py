"""Shared helpers for the tests: small deterministic chunks and prompts."""

from __future__ import annotations

import numpy as np

from kvtier import KVChunk, Namespace

CHUNK_TOKENS = 16
SHAPE = (2, 2, CHUNK_TOKENS, 2, 8)  # layers, K/V, tokens, kv heads, head dim
NS = Namespace("test/tiny-llama", model_revision="r1", kv_dtype="float16")


def chunk(seed: int, shape: tuple[int, ...] = SHAPE) -> KVChunk:
    """A float16 chunk whose values depend only on ``seed``."""
    rng = np.random.default_rng(seed)
    return KVChunk.from_array(rng.standard_normal(shape).astype(np.float16))


def prompt(seed: int, n_chunks: int, extra: int = 0) -> list[int]:
    """Token ids of ``n_chunks`` full chunks plus ``extra`` tokens."""
    rng = np.random.default_rng(10_000 + seed)
    ids: list[int] = rng.integers(0, 49152, size=n_chunks * CHUNK_TOKENS + extra).tolist()
    return ids


def chunks_for(seed: int, n: int, shape: tuple[int, ...] = SHAPE) -> list[KVChunk]:
    return [chunk(seed * 1000 + j, shape) for j in range(n)]


def same(a: KVChunk, b: KVChunk) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.data) == bytes(b.data)
