"""What the router looks up for a prompt: its chunk keys and possible tails (:class:`PromptKeys`),
which of them the tier every engine shares holds (:class:`SharedTier`), and what an engine
holds of it (:func:`held_hits`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from kvtier.health import TierHealth
from kvtier.keys import Namespace, chunk_keys, tail_candidates, tail_granule, token_array
from kvtier.policy.routing import leading_hits
from kvtier.router.index import ChunkIndex
from kvtier.tiers.redis import credentials

SHARED_TIMEOUT_S = 0.25  # a shared tier slower than this is failing (health)
SHARED_BUDGET_S = 0.003  # what a request waits for the shared tier's answer
SHARED_KNOWN_S = 30.0  # how long a chunk the shared tier said it holds counts as held
SHARED_KNOWN_MAX = 1 << 20
SHARED_MAX_ASKING = 8


class PromptKeys:
    """A prompt's chunk keys and, after each leading run of them, its possible tails (whole
    tail granules, shorter than a chunk: what an engine saves after a prompt's last full chunk,
    see :func:`kvtier.keys.tail_granule`), so that a returning turn is credited with the tail
    its previous turn left."""

    def __init__(
        self,
        tokens: Sequence[int],
        namespace: Namespace,
        chunk: int,
        block: int,
        complete: bool = True,
        granule: int | None = None,
    ):
        """``complete``: ``tokens`` are the whole prompt (not only its leading tokens, after
        which no tail is known); ``granule``: what the engines' tails are a multiple of (their
        ``tail_tokens``; :func:`~kvtier.keys.tail_granule` of ``block`` unless told)."""
        ids = token_array(tokens)
        self.chunk, self.block = chunk, block
        granule = granule or tail_granule(block)
        self.keys = chunk_keys(ids, namespace, chunk)
        self.hexes = [k.hex() for k in self.keys]
        self.shared: list[bool] = []
        # tails[n]: (tokens, hex key, in the shared tier) of the tails after n full chunks
        self.tails: list[list[tuple[int, str, bool]]] = []
        self._tail_keys: list[bytes] = []
        for n in range(len(self.keys) + 1):
            if n == len(self.keys) and not complete:
                self.tails.append([])
                continue
            found = tail_candidates(ids, namespace, chunk, granule, self.keys, after=n)
            self.tails.append([(m, key.hex(), False) for m, key in found])
            self._tail_keys.extend(key for _, key in found)

    @property
    def saved(self) -> list[str]:
        """Hex keys an engine saves once it has computed the prompt: its full chunks and the
        tail after them."""
        return self.hexes + [key for _, key, _ in self.tails[-1][:1]]

    @property
    def all_keys(self) -> list[bytes]:
        return [*self.keys, *self._tail_keys]

    def in_shared(self, held: Sequence[bool]) -> None:
        """What the shared tier said of :attr:`all_keys`."""
        self.shared = list(held[: len(self.keys)])
        rest = iter(held[len(self.keys) :])
        self.tails = [[(m, key, next(rest, False)) for m, key, _ in after] for after in self.tails]


class SharedTier:
    """The tier every engine shares, asked directly (pipelined EXISTS, on the router's event
    loop: no thread hop) which chunks it holds.

    A request waits at most :data:`SHARED_BUDGET_S` for the answer: the shared tier may be
    busy taking an engine's writes (hundreds of MB for a long prompt), and routing must not
    wait behind them. What it has said it holds is remembered for :data:`SHARED_KNOWN_S`, so
    a returning prompt asks only about its new chunks; a late answer still fills that memory.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        cluster: bool = False,
        username: str = "",
        password_file: str = "",
    ):
        import redis.asyncio

        self.url = url
        self._prefix = f"{prefix}:v1:".encode()
        options: dict[str, Any] = {
            "socket_timeout": SHARED_TIMEOUT_S,
            "socket_connect_timeout": SHARED_TIMEOUT_S,
            **credentials(username, password_file),
        }
        self._client: Any = (
            redis.asyncio.RedisCluster.from_url(url, **options)
            if cluster
            else redis.asyncio.Redis.from_url(url, **options)
        )
        self._health = TierHealth("shared tier (router)", 1.0)
        self._known: dict[bytes, float] = {}  # key -> until when it counts as held
        self._asking: set[asyncio.Task[None]] = set()
        self.late = 0  # answers that came after the budget

    async def holds(self, keys: Sequence[bytes]) -> list[bool]:
        now = time.monotonic()
        unknown = [k for k in keys if self._known.get(k, 0.0) <= now]
        if unknown and self._health.available() and len(self._asking) < SHARED_MAX_ASKING:
            task = asyncio.create_task(self._ask(unknown))
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)
            done, _ = await asyncio.wait({task}, timeout=SHARED_BUDGET_S)
            if not done:
                self.late += 1
        now = time.monotonic()
        return [self._known.get(k, 0.0) > now for k in keys]

    async def _ask(self, keys: list[bytes]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._prefix + key.hex().encode())
            found = await asyncio.wait_for(pipe.execute(), SHARED_TIMEOUT_S)
        except Exception as exc:  # down or slow: no shared hits, the request goes on
            self._health.failed(exc)
            return
        self._health.succeeded()
        until = time.monotonic() + SHARED_KNOWN_S
        for key, n in zip(keys, found, strict=False):
            if n:
                self._known[key] = until
        if len(self._known) > SHARED_KNOWN_MAX:  # forget the expired, then the oldest
            now = time.monotonic()
            self._known = {k: t for k, t in self._known.items() if t > now}
            while len(self._known) > SHARED_KNOWN_MAX:
                del self._known[next(iter(self._known))]

    async def warm(self) -> None:
        """Open the connection now, not on the first request."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.ping(), 5.0)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.aclose()


def held_hits(index: ChunkIndex, engine: str, prompt: PromptKeys) -> dict[str, int]:
    """Tokens per tier kind that ``engine`` holds of a prompt (its leading chunks, then the
    longest tail after them), counting the shared tier; predicted chunks count as DRAM."""
    held = index.kinds(engine, prompt.hexes)
    kinds = [
        {"dram" if k == "predicted" else k for k in held[i]} if i < len(held) else set()
        for i in range(len(prompt.hexes))
    ]
    for i, on in enumerate(prompt.shared):
        if on:
            kinds[i].add("shared")
    run = next((i for i, k in enumerate(kinds) if not k), len(kinds))
    hits = leading_hits([sorted(k) for k in kinds[:run]], [prompt.chunk] * run)
    for tokens, key, on_shared in prompt.tails[run]:
        tail = {
            "dram" if k == "predicted" else k for k in (index.kinds(engine, [key]) or [set()])[0]
        }
        if on_shared:
            tail.add("shared")
        if tail:
            for kind, n in leading_hits([sorted(tail)], [tokens]).items():
                hits[kind] = hits.get(kind, 0) + n
            break
    return hits
