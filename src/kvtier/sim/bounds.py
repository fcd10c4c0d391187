"""The bounds a replay is held against: a cache that never forgets, and Belady's optimum (the
block needed furthest in the future leaves first; a block never needed again is not kept)."""

from __future__ import annotations

import heapq
from collections.abc import Container, Sequence

from kvtier.sim.trace import BLOCK_TOKENS, Request

_NEVER = 1 << 62


def _leading(ids: Sequence[int], held: Container[int]) -> int:
    """How many of ``ids``, from the first, are all in ``held``."""
    n = 0
    for key in ids:
        if key not in held:
            break
        n += 1
    return n


def infinite_hits(requests: Sequence[Request]) -> tuple[int, int]:
    """(blocks, tokens) hit by a cache that never forgets."""
    seen: set[int] = set()
    blocks = tokens = 0
    for request in requests:
        ids = request.hash_ids
        n = _leading(ids, seen)
        blocks += n
        tokens += min(request.input_length, n * BLOCK_TOKENS)
        seen.update(ids)
    return blocks, tokens


def belady_hits(requests: Sequence[Request], capacity: int) -> tuple[int, int]:
    """(blocks, tokens) hit by Belady's policy with room for ``capacity`` blocks."""
    flat = [key for request in requests for key in request.hash_ids]
    next_use = [_NEVER] * len(flat)
    last: dict[int, int] = {}
    for pos in range(len(flat) - 1, -1, -1):
        key = flat[pos]
        next_use[pos] = last.get(key, _NEVER)
        last[key] = pos
    held: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale entries skipped lazily
    blocks = tokens = 0
    pos = 0
    for request in requests:
        ids = request.hash_ids
        n = _leading(ids, held)
        blocks += n
        tokens += min(request.input_length, n * BLOCK_TOKENS)
        for key in ids:
            nxt = next_use[pos]
            pos += 1
            if nxt == _NEVER:  # never needed again: free its room, never admit it
                held.pop(key, None)
                continue
            if key not in held and len(held) >= capacity:
                while -heap[0][0] != held.get(heap[0][1]):
                    heapq.heappop(heap)
                if -heap[0][0] < nxt:
                    continue  # everything held is needed sooner: do not admit
                del held[heapq.heappop(heap)[1]]
            held[key] = nxt
            heapq.heappush(heap, (-nxt, key))
    return blocks, tokens
