"""Chunk identity: deterministic, namespaced, prefix-chained 128-bit keys."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvtier.keys import KEY_BYTES, Namespace, chunk_keys, parse_key, tail_candidates, tail_key

# Pinned values: if these change, every stored chunk everywhere becomes unreachable. Change
# them only together with KEY_SCHEME_VERSION and a note in the changelog.
PINNED_ROOT = "2f45674e3bf43159e12dbb1701505897"
PINNED_KEYS = ["938a78f505f955cd094d8789bd7f0e8a", "16da4c1fe86e80eb47ce56042a7dd99d"]


def test_keys_are_pinned_across_versions_and_machines() -> None:
    # The namespace's fields are pinned here, the default layout tag included: bumping it (as
    # KV_LAYOUT's v2 did, when vLLM's CPU cache came to be read per token) moves every key.
    ns = Namespace("test-model", kv_layout="layers,kv,tokens,heads,dim")
    assert ns.root(256).hex() == PINNED_ROOT
    assert [k.hex() for k in chunk_keys(list(range(512)), ns, 256)] == PINNED_KEYS


def test_input_types_give_the_same_keys() -> None:
    ns = Namespace("m")
    tokens = list(range(300, 812))
    expected = chunk_keys(tokens, ns, 256)
    assert chunk_keys(np.array(tokens, dtype=np.int64), ns, 256) == expected
    assert chunk_keys(np.array(tokens, dtype=np.uint32), ns, 256) == expected
    assert chunk_keys(tuple(tokens), ns, 256) == expected


def test_only_full_chunks_get_keys_and_keys_chain_the_prefix() -> None:
    ns = Namespace("m")
    long = list(range(1000))
    keys = chunk_keys(long, ns, 256)
    assert len(keys) == 3 and all(len(k) == KEY_BYTES for k in keys)
    assert chunk_keys(long[:600], ns, 256) == keys[:2]
    assert chunk_keys(long[:255], ns, 256) == []
    # Same second chunk after a different first chunk: a different key.
    other = [7] * 256 + long[256:512]
    assert chunk_keys(other, ns, 256)[1] != keys[1]


def test_a_tail_gets_its_own_key_that_no_chunk_can_have() -> None:
    ns = Namespace("m")
    long = list(range(1000))
    keys = chunk_keys(long, ns, 256, tail=True)
    assert keys[:3] == chunk_keys(long, ns, 256) and len(keys) == 4
    assert keys[3] == tail_key(keys[2], long[768:])
    assert chunk_keys(long[:768], ns, 256, tail=True) == keys[:3]  # no partial chunk: no tail
    assert chunk_keys(long[:100], ns, 256, tail=True) == [tail_key(ns.root(256), long[:100])]
    # A tail of a whole chunk's tokens is still not that chunk's key (personalised hash).
    assert tail_key(ns.root(256), long[:256]) != keys[0]
    assert tail_key(keys[2], long[768:896]) != tail_key(keys[2], [*long[768:895], 5])


def test_tail_candidates_are_whole_granules_longest_first() -> None:
    ns = Namespace("m")
    tokens = list(range(256 + 200))  # one chunk, then 200 tokens: tails of 192, 128 and 64
    full = chunk_keys(tokens, ns, 256)
    got = tail_candidates(tokens, ns, 256, 64)
    assert got == [(m, tail_key(full[0], tokens[256 : 256 + m])) for m in (192, 128, 64)]
    assert tail_candidates(tokens, ns, 256, 64, full) == got
    assert tail_candidates(tokens[:300], ns, 256, 64) == []  # 44 tokens: no whole block
    with pytest.raises(ValueError, match="granule 100 must divide"):
        tail_candidates(tokens, ns, 256, 100)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other-model"},
        {"model_revision": "r2"},
        {"kv_dtype": "float16"},
        {"kv_layout": "other"},
        {"tenant_salt": "tenant-a"},
        {"tenant_salt": ""},
        {"adapter": "lora-1"},
    ],
)
def test_every_namespace_field_changes_the_keys(change: dict[str, str]) -> None:
    base = Namespace("m", model_revision="r1", kv_dtype="bfloat16")
    changed = Namespace(**{**base.__dict__, **change})
    tokens = list(range(256))
    assert chunk_keys(tokens, base, 256) != chunk_keys(tokens, changed, 256)


def test_chunk_size_is_part_of_the_key() -> None:
    ns = Namespace("m")
    assert chunk_keys(list(range(512)), ns, 256)[1] != chunk_keys(list(range(512)), ns, 512)[0]


@pytest.mark.parametrize("tokens", [[-1] * 256, [2**32] * 256, [[1, 2], [3, 4]], [0.5] * 256])
def test_bad_token_ids_are_rejected(tokens: object) -> None:
    with pytest.raises(ValueError, match="token"):
        chunk_keys(tokens, Namespace("m"), 256)


def test_bad_namespace_and_key_text_are_rejected() -> None:
    with pytest.raises(ValueError, match="model"):
        Namespace("")
    with pytest.raises(ValueError, match="32 hex"):
        parse_key("../../etc/passwd")
    assert parse_key(PINNED_KEYS[0]).hex() == PINNED_KEYS[0]


def test_hashing_128k_tokens_is_well_under_10ms() -> None:
    tokens = np.random.default_rng(0).integers(0, 128_000, size=128 * 1024).tolist()
    ns = Namespace("m")
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        keys = chunk_keys(tokens, ns, 256)
        best = min(best, time.perf_counter() - start)
    assert len(keys) == 512
    assert best < 0.010, f"hashing 128K tokens took {best * 1e3:.1f} ms"
