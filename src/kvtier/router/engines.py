"""The engines behind a router: health, feeds into the index, and what was measured on each.

Each engine is polled for ``/health`` every :data:`HEALTH_EVERY_S`; two failures in a row (or
a refused connection while forwarding) take it out of rotation, so a dead engine is gone
within a second. Its feed (``/kvtier/...``, see :mod:`kvtier.integrations.feed`) is read with long
polls: a snapshot first, then events in sequence; a gap or a new epoch (a restart) means a
fresh snapshot. vLLM's own KV events (its ZMQ publisher, named by the feed's ``kv_events``) say
which chunks are in the engine's KV cache itself: tier kind "gpu" (:mod:`kvtier.router.blocks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp
import msgspec
import zmq
import zmq.asyncio

from kvtier.keys import ChunkKey, Namespace
from kvtier.router.blocks import BlockKeys
from kvtier.router.index import ChunkIndex
from kvtier.router.rates import PrefillRates, rate_of

log = logging.getLogger("kvtier.router")

HEALTH_EVERY_S = 0.25
HEALTH_TIMEOUT_S = 0.5
INFO_EVERY_S = 2.0
POLL_WAIT_S = 5.0
RATE_SAMPLES = 32  # an engine's prefill rate: tokens / seconds over its latest samples
MIN_SAMPLE_TOKENS = 256  # fewer recomputed tokens say little about the prefill rate
MIN_BANDWIDTH_BYTES = 16 << 20  # reads before an engine's own tier bandwidth is trusted


@dataclass
class Timing:
    """The prefill work an idle engine did before a request's first token: its own tokens,
    and those of requests that arrived after it and went first (on an engine that schedules
    hits first, the ones with less work; elsewhere none: they queue behind it).

    Without it, a request that found the engine idle but was joined by a burst of others
    measured their work as its own: 12 prompts sent at once to two engines measured 44
    tokens/s where one prompt alone computes 170."""

    own: int
    tokens: int = 0

    def __post_init__(self) -> None:
        self.tokens = self.own

    def joined(self, tokens: int, hits_first: bool) -> None:
        if hits_first and tokens <= self.own:
            self.tokens += tokens

    def grew(self, delta: int) -> None:
        """Its own prompt turned out ``delta`` tokens longer (or shorter)."""
        self.own += delta
        self.tokens += delta


@dataclass
class Engine:
    url: str
    prefill_only: bool = False  # a disaggregated pod's prefill engine (decodes nothing)
    healthy: bool = False
    failures: int = 0
    info: dict[str, Any] | None = None
    kinds: dict[str, str] = field(default_factory=dict)  # tier name -> kind
    synced: bool = False
    epoch: str = ""
    seq: int = 0
    queued_tokens: int = 0  # prefill tokens routed here whose first token is not back yet
    queued_work: Counter[int] = field(default_factory=Counter)  # those tokens, per request
    in_flight: int = 0
    routed: int = 0
    samples: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    sampled: int = 0  # samples ever taken (a version of ``samples``)
    bandwidth: dict[str, float] = field(default_factory=dict)  # tier kind -> bytes/s
    blocks: BlockKeys | None = None  # vLLM's blocks -> chunk keys, while its events are read
    block_gaps: int = 0  # times vLLM's events were lost (or it restarted) and were dropped
    timing: Timing | None = None  # the request that found it idle, until its first token

    def enqueue(self, tokens: int) -> None:
        """A request adds ``tokens`` to compute to its queue (a route's own call)."""
        if self.timing is not None:
            self.timing.joined(tokens, self.hits_first)
        self.queued_tokens += tokens
        self.queued_work[tokens] += 1

    def dequeue(self, tokens: int) -> None:
        """A request's ``tokens`` leave its queue (a route's own call)."""
        self.queued_tokens -= tokens
        self.queued_work[tokens] -= 1
        if self.queued_work[tokens] <= 0:
            del self.queued_work[tokens]

    @property
    def hits_first(self) -> bool:
        """It serves the requests with the least to compute first (its /kvtier/info says)."""
        scheduling = (self.info or {}).get("scheduling") or {}
        return bool(scheduling.get("hits_first"))

    def measured_prefill(self, tokens: int, seconds: float) -> None:
        """A request that found this engine idle computed ``tokens`` in ``seconds``."""
        if tokens < MIN_SAMPLE_TOKENS or seconds <= 0:
            return
        self.samples.append((tokens, min(max(seconds, tokens / 1e7), tokens / 10.0)))
        self.sampled += 1
        if len(self.samples) > RATE_SAMPLES:
            del self.samples[0]

    @property
    def prefill_tokens_per_s(self) -> float:
        """Its measured prefill rate over its recent samples (a default before any)."""
        return rate_of(self.samples)

    def state(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "role": "prefill" if self.prefill_only else "serve",
            "healthy": self.healthy,
            "synced": self.synced,
            "hits_first": self.hits_first,
            "queued_tokens": self.queued_tokens,
            "in_flight": self.in_flight,
            "routed": self.routed,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "bandwidth_bytes_per_s": {k: round(v) for k, v in self.bandwidth.items()},
            "vllm_blocks": None
            if self.blocks is None
            else {
                "tracked": len(self.blocks),
                "unkeyed": self.blocks.unkeyed,
                "gaps": self.block_gaps,
            },
        }


class EngineSet:
    """The engines, their health and their feeds. Use from one event loop."""

    def __init__(self, urls: list[str], index: ChunkIndex, prefill: list[str] | None = None):
        if not urls:
            raise ValueError("a router needs at least one engine (--worker URL)")
        self.engines = [Engine(url.rstrip("/")) for url in urls]
        self.engines += [Engine(url.rstrip("/"), prefill_only=True) for url in prefill or ()]
        seen = [e.url for e in self.engines]
        if len(set(seen)) != len(seen):
            raise ValueError(f"an engine is listed twice: {', '.join(seen)}")
        self.index = index
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()  # set once any engine is healthy
        self._rates = PrefillRates()

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        for engine in self.engines:
            self._tasks.append(asyncio.create_task(self._watch(engine)))
            self._tasks.append(asyncio.create_task(self._follow(engine)))
            self._tasks.append(asyncio.create_task(self._follow_blocks(engine)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def prefill_rate(self, engine: Engine) -> float:
        """``engine``'s prefill rate for routing: the pod's, moved toward its own only beyond
        its noise (:mod:`kvtier.router.rates`)."""
        pod = [e.samples for e in self.engines]
        return self._rates.of(engine.samples, pod, sum(e.sampled for e in self.engines))

    def healthy(self, prefill_only: bool = False) -> list[Engine]:
        """Engines in rotation: those that answer requests, or the prefill-only ones."""
        return [e for e in self.engines if e.healthy and e.prefill_only == prefill_only]

    def down(self, engine: Engine, why: str) -> None:
        if engine.healthy:
            log.warning("kvtier router: %s out of rotation (%s)", engine.url, why)
        engine.healthy = False
        engine.failures = max(engine.failures, 2)

    # -- health ----------------------------------------------------------------------------

    async def _watch(self, engine: Engine) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        next_info = 0.0
        while True:
            try:
                async with self._session.get(f"{engine.url}/health", timeout=timeout) as r:
                    ok = r.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                if not engine.healthy:
                    log.info("kvtier router: %s in rotation", engine.url)
                engine.healthy, engine.failures = True, 0
                self.ready.set()
                if time.monotonic() >= next_info:
                    await self._refresh_info(engine)
                    next_info = time.monotonic() + INFO_EVERY_S
            else:
                engine.failures += 1
                if engine.failures >= 2:
                    self.down(engine, "health check failed")
            await asyncio.sleep(HEALTH_EVERY_S)

    async def _refresh_info(self, engine: Engine) -> None:
        info = await self._get_json(engine, "/kvtier/info", 2.0)
        if info is None:
            return
        engine.info = info
        engine.kinds = {t["name"]: t["kind"] for t in info.get("tiers", ())}
        for name, reads in (info.get("reads") or {}).items():
            kind = engine.kinds.get(name)
            if kind and reads.get("bytes", 0) >= MIN_BANDWIDTH_BYTES and reads.get("seconds"):
                engine.bandwidth[kind] = reads["bytes"] / reads["seconds"]

    # -- feed ------------------------------------------------------------------------------

    async def _follow(self, engine: Engine) -> None:
        while True:
            if not engine.healthy:
                engine.synced = False
                await asyncio.sleep(HEALTH_EVERY_S)
                continue
            try:
                if not engine.synced:
                    await self._resync(engine)
                    continue
                query = f"?epoch={engine.epoch}&after={engine.seq}&wait={POLL_WAIT_S}"
                body = await self._get_json(engine, "/kvtier/events" + query, POLL_WAIT_S + 5)
                if body is None:
                    engine.synced = False
                    await asyncio.sleep(0.5)
                    continue
                if body.get("resync"):
                    engine.synced = False
                    continue
                for event in body.get("events", ()):
                    if event["seq"] != engine.seq + 1:  # a gap: events were lost
                        engine.synced = False
                        break
                    kind = engine.kinds.get(event["tier"], event["tier"])
                    self.index.apply(engine.url, kind, event)
                    engine.seq = event["seq"]
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad feed must not stop the router: recompute, resync
                log.exception("kvtier router: reading %s's feed failed", engine.url)
                engine.synced = False
                await asyncio.sleep(1.0)

    async def _resync(self, engine: Engine) -> None:
        await self._refresh_info(engine)
        snapshot = await self._get_json(engine, "/kvtier/snapshot", 30.0)
        if snapshot is None or engine.info is None:
            await asyncio.sleep(0.5)
            return
        by_kind: dict[str, list[str]] = {}
        for name, keys in snapshot.get("entries", {}).items():
            by_kind.setdefault(engine.kinds.get(name, name), []).extend(keys)
        self.index.replace(engine.url, by_kind)
        engine.epoch, engine.seq, engine.synced = snapshot["epoch"], snapshot["seq"], True
        chunks = sum(map(len, by_kind.values()))
        log.info("kvtier router: %s synced (%d chunks)", engine.url, chunks)

    # -- vLLM's own KV events ----------------------------------------------------------------

    def _block_source(self, engine: Engine) -> tuple[str, str, str] | None:
        """(ZMQ endpoint, topic, feed epoch) of the engine's KV events, once its feed says."""
        info = engine.info or {}
        events = info.get("kv_events")
        if not engine.synced or not events or "namespace" not in info:
            return None
        host = urlparse(engine.url).hostname or "127.0.0.1"
        return f"tcp://{host}:{int(events['port'])}", str(events.get("topic", "")), engine.epoch

    def _block_keys(self, engine: Engine) -> BlockKeys:
        assert engine.info is not None
        fields, chunk = engine.info["namespace"], int(engine.info["chunk_tokens"])
        roots: dict[str | None, ChunkKey] = {}

        def root(salt: str | None) -> ChunkKey:
            if salt not in roots:
                roots[salt] = Namespace(**fields, tenant_salt=salt).root(chunk)
            return roots[salt]

        return BlockKeys(root, chunk)

    async def _follow_blocks(self, engine: Engine) -> None:
        """Read the engine's vLLM KV events into the index (tier kind "gpu"); a new endpoint
        or epoch (the engine restarted) starts over."""
        context = zmq.asyncio.Context.instance()
        socket: zmq.asyncio.Socket | None = None
        source: tuple[str, str, str] | None = None
        last: int | None = None
        try:
            while True:
                now = self._block_source(engine)
                if now != source:
                    if socket is not None:
                        socket.close(linger=0)
                        socket = None
                    self.index.drop_kind(engine.url, "gpu")
                    engine.blocks, source, last = None, now, None
                    if now is not None:
                        socket = context.socket(zmq.SUB)
                        socket.setsockopt(zmq.SUBSCRIBE, now[1].encode())
                        socket.connect(now[0])
                        engine.blocks = self._block_keys(engine)
                if socket is None or engine.blocks is None:
                    await asyncio.sleep(HEALTH_EVERY_S)
                    continue
                if not await socket.poll(1000):
                    continue
                frames = await socket.recv_multipart()
                try:
                    last = self._apply_blocks(engine, engine.blocks, frames, last)
                except (ValueError, TypeError, KeyError, IndexError, msgspec.DecodeError):
                    log.exception("kvtier router: a bad KV event batch from %s", engine.url)
        except asyncio.CancelledError:
            raise
        finally:
            if socket is not None:
                socket.close(linger=0)

    def _apply_blocks(
        self, engine: Engine, blocks: BlockKeys, frames: list[bytes], last: int | None
    ) -> int:
        """One message of vLLM's publisher; returns its sequence number."""
        if len(frames) != 3:
            raise ValueError(f"expected 3 frames (topic, sequence, batch), got {len(frames)}")
        seq = int.from_bytes(frames[1], "big")
        if last is not None and seq != last + 1:  # lost events, or vLLM restarted
            if seq <= last:
                blocks.clear()
            self.index.drop_kind(engine.url, "gpu")
            engine.block_gaps += 1
        batch = msgspec.msgpack.decode(frames[2])
        stamp = float(batch[0])
        for event in batch[1]:
            kind = event.get("type")
            if event.get("medium") not in (None, "GPU"):  # vLLM's own CPU offload: not here
                continue
            if kind == "BlockStored":
                keys, change = blocks.stored(event), "stored"
            elif kind == "BlockRemoved":
                keys, change = blocks.removed(event.get("block_hashes") or ()), "removed"
            elif kind == "AllBlocksCleared":
                blocks.clear()
                self.index.drop_kind(engine.url, "gpu")
                continue
            else:
                continue
            if keys:
                self.index.apply(engine.url, "gpu", {"kind": change, "keys": keys, "t": stamp})
        return seq

    async def _get_json(self, engine: Engine, path: str, timeout_s: float) -> Any:
        assert self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._session.get(engine.url + path, timeout=timeout) as r:
                if r.status != 200:
                    return None
                return await r.json()
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None
