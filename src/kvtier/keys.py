"""Chunk identity: namespaces, 128-bit chunk keys and the prefix hash chain.

A token sequence is cut into fixed chunks of ``chunk_tokens`` tokens. Key of chunk i =
BLAKE2b-128(key of chunk i-1 || token ids of chunk i as little-endian uint32), and the chain
starts at a root derived from the :class:`Namespace`. So a key names a chunk *and everything
before it*: equal keys mean equal prefixes, hence equal KV.

The tokens after the last full chunk can be stored too, as a *tail*: a partial chunk whose key
is BLAKE2b-128(key of the last full chunk || its token ids), personalised with
``kvtier-tail`` so that no tail key can equal a chunk key. A tail ends the chain (nothing is
keyed after it); a prompt that grows past it stores the full chunk under its own key. Tails
make reuse nearly as fine-grained as tokens while chunks stay large objects: a tail is a
whole number of :data:`TAIL_TOKENS` (16), so a returning chat turn recomputes at most 15 tokens
of what its previous turn left, not up to an engine block's worth (128 tokens on vLLM's CPU
backend: ~1 s of compute per hit on one core here).

Why BLAKE2b and not xxh3: the cache may be shared between tenants, and a non-cryptographic
hash lets an adversary craft a prompt whose chunk key collides with someone else's (cache
poisoning). BLAKE2b costs ~1-2 ms for 128K tokens here, well inside the lookup budget.

The encoding is explicit (length-prefixed UTF-8 fields, little-endian integers), so keys are
identical across processes, machines and Python versions; ``hash()`` is never used.
"""

from __future__ import annotations

import array
import hashlib
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NewType

import numpy as np

ChunkKey = NewType("ChunkKey", bytes)
"""16 bytes: fits the key limits of hardware KV stores."""

KEY_BYTES = 16
KEY_SCHEME_VERSION = 1
_ROOT_TAG = b"kvtier/namespace/v1"
_TAIL_PERSON = b"kvtier-tail"
_MAX_TOKEN_ID = 2**32 - 1
# The payload's layout. v2: vLLM's CPU cache is read per token (K is stored transposed there);
# before, its blocks were copied as opaque bytes, so CPU chunks of v1 hold another layout.
KV_LAYOUT = "layers,kv,tokens,heads,dim;v2"
# An AMX-packed cache's blocks, copied whole: per layer, each block's bytes in token order of
# the blocks (v2; v1 interleaved them 64 values at a time, as if K and V of each token).
PACKED_LAYOUT = "opaque-blocks:vllm-cpu-amx;v2"
TAIL_TOKENS = 16  # a tail's tokens are a whole multiple of this (or of a finer engine block)


def tail_granule(block_size: int) -> int:
    """Tokens a tail is a multiple of, for an engine whose blocks hold ``block_size`` tokens:
    :data:`TAIL_TOKENS`, or a divisor of it that divides the block (so of every chunk)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return math.gcd(block_size, TAIL_TOKENS)


# A salt derived by kvtier.tenants: "kvt1-", the tenant's id (16 hex digits), "-", 64 hex digits.
SALT_PREFIX = "kvt1-"
_DERIVED_SALT = re.compile(r"kvt1-[0-9a-f]{16}-[0-9a-f]{64}")


def salt_tenant(salt: str | None) -> str | None:
    """The tenant id a derived salt begins with (None: not a derived salt)."""
    if salt and _DERIVED_SALT.fullmatch(salt):
        return salt[len(SALT_PREFIX) : len(SALT_PREFIX) + 16]
    return None


@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that changes the KV bytes of a chunk.

    Two requests share chunks only when every field is equal.

    Attributes:
        model: model name or path, as the engine names it.
        model_revision: revision or hash of the model's config/weights ("" when unknown).
        kv_dtype: dtype of the stored KV ("bfloat16", "float16", "float32", "float8_e4m3fn"...).
        kv_layout: engine-independent layout tag; bump it if the payload layout ever changes.
        tenant_salt: isolates tenants (vLLM's ``cache_salt``); None means no salt.
        adapter: LoRA or other adapter that changes the KV ("" for the base model).
    """

    model: str
    model_revision: str = ""
    kv_dtype: str = "bfloat16"
    kv_layout: str = KV_LAYOUT
    tenant_salt: str | None = None
    adapter: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("Namespace.model must name the model (got an empty string)")

    def root(self, chunk_tokens: int) -> ChunkKey:
        """The chain's starting value for chunks of ``chunk_tokens`` tokens."""
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        h.update(_ROOT_TAG)
        h.update(struct.pack("<I", chunk_tokens))
        salt = self.tenant_salt
        fields = (
            self.model,
            self.model_revision,
            self.kv_dtype,
            self.kv_layout,
            self.adapter,
            "" if salt is None else "salt:" + salt,
        )
        for field in fields:
            raw = field.encode("utf-8")
            h.update(struct.pack("<I", len(raw)))
            h.update(raw)
        return ChunkKey(h.digest())

    def id(self, chunk_tokens: int) -> str:
        """Short printable id of this namespace (first 8 bytes of the root, hex)."""
        return self.root(chunk_tokens)[:8].hex()


_ARRAY_U32 = array.array("I").itemsize == 4  # C unsigned int is 32 bits here


def token_array(tokens: Sequence[int] | Any) -> np.ndarray:
    """Token ids as a little-endian uint32 array; rejects ids outside [0, 2**32)."""
    if isinstance(tokens, list | tuple) and _ARRAY_U32:
        # What vLLM hands over: a list of ints. array.array converts it ~8x faster than
        # numpy (1.5 against 12 ms for 128K tokens on an AVX2-only EPYC) and range-checks.
        try:
            ids = np.frombuffer(array.array("I", tokens), dtype=np.uint32)
            return ids.astype("<u4", copy=False)
        except OverflowError:
            lo, hi = min(tokens), max(tokens)
            raise ValueError(f"token ids must be in [0, 2**32), got min {lo} max {hi}") from None
        except TypeError:
            pass  # not all ints: numpy names the problem below
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of ids, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > _MAX_TOKEN_ID:
        raise ValueError(f"token ids must be in [0, 2**32), got min {lo} max {hi}")
    return arr.astype("<u4", copy=False)


def chunk_keys(
    tokens: Sequence[int] | Any,
    namespace: Namespace,
    chunk_tokens: int,
    max_chunks: int | None = None,
    tail: bool = False,
) -> list[ChunkKey]:
    """Keys of every full chunk of ``tokens``; with ``tail``, then the key of the trailing
    partial chunk, if there is one (:func:`tail_key`). Without it a partial chunk has none."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    ids = token_array(tokens)
    n = len(ids) // chunk_tokens
    if max_chunks is not None:
        n = min(n, max_chunks)
        tail = tail and max_chunks > n
    raw = ids[: n * chunk_tokens].tobytes()
    step = chunk_tokens * 4
    prev = namespace.root(chunk_tokens)
    keys: list[ChunkKey] = []
    blake = hashlib.blake2b
    for i in range(n):
        h = blake(prev, digest_size=KEY_BYTES)
        h.update(raw[i * step : (i + 1) * step])
        prev = ChunkKey(h.digest())
        keys.append(prev)
    if tail and len(ids) > n * chunk_tokens:
        keys.append(tail_key(prev, ids[n * chunk_tokens :]))
    return keys


def next_chunk_key(prev: ChunkKey, chunk: Sequence[int] | Any) -> ChunkKey:
    """Key of the full chunk ``chunk`` (token ids) that follows the chunk keyed ``prev`` (the
    namespace's root for the first): one step of :func:`chunk_keys`."""
    h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
    h.update(token_array(chunk).tobytes())
    return ChunkKey(h.digest())


def tail_key(parent: ChunkKey, tail: Sequence[int] | Any) -> ChunkKey:
    """Key of the partial chunk ``tail`` that follows the chunk keyed ``parent`` (the
    namespace's root when the tail is the first chunk)."""
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES, person=_TAIL_PERSON)
    h.update(token_array(tail).tobytes())
    return ChunkKey(h.digest())


def tail_candidates(
    tokens: Sequence[int] | Any,
    namespace: Namespace,
    chunk_tokens: int,
    granule: int,
    full_keys: Sequence[ChunkKey] | None = None,
    after: int | None = None,
) -> list[tuple[int, ChunkKey]]:
    """(tail tokens, tail key) of every tail that can follow the first ``after`` full chunks
    of ``tokens`` (default: all of them): whole multiples of ``granule`` tokens (see
    :func:`tail_granule`), shorter than a chunk, longest first. ``full_keys``: the chunk keys,
    if known."""
    if granule <= 0 or chunk_tokens % granule:
        raise ValueError(f"granule {granule} must divide chunk_tokens {chunk_tokens}")
    ids = token_array(tokens)
    n = len(ids) // chunk_tokens if after is None else after
    keys = full_keys if full_keys is not None else chunk_keys(ids, namespace, chunk_tokens, n)
    parent = keys[n - 1] if n else namespace.root(chunk_tokens)
    rest = ids[n * chunk_tokens : (n + 1) * chunk_tokens - 1]
    longest = len(rest) // granule * granule
    return [(m, tail_key(parent, rest[:m])) for m in range(longest, 0, -granule)]


def parse_key(text: str) -> ChunkKey:
    """A key from its 32-character hex form (as in file names and Redis keys)."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"not a chunk key: {text!r} (want 32 hex digits)") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"not a chunk key: {text!r} (want 32 hex digits)")
    return ChunkKey(raw)
