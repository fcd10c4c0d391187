"""``kvtier router``: an OpenAI-compatible front for several engines that sends each request
where its context already is.

For each request: the prompt's tokens as the engine will see them (:mod:`.prompts`), its chunk
keys in the engines' namespace (reported by their feeds), where those chunks are (the index fed
by every engine, plus the shared tier, asked directly), then the engine with the lowest
expected time to first token (:class:`~kvtier.policy.routing.CostRouting`). The request is
forwarded unchanged; the engine's answer, errors included, comes back unchanged.

A request that has not produced a byte yet is retried on the next engine when the one chosen
fails (connection refused or dropped); a stream already started ends with an error event. The
shared tier being down costs hits (it counts as empty), never requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from kvtier.console.app import LINGER_S, Console
from kvtier.keys import Namespace
from kvtier.policy.routing import CostRouting, EngineView, Split, reason, split_cost
from kvtier.router.engines import Engine, EngineSet
from kvtier.router.index import ChunkIndex, quantile
from kvtier.router.lookup import PromptKeys, SharedTier, held_hits
from kvtier.router.metrics import router_metrics
from kvtier.router.prompts import Leading, Prompter, PromptError
from kvtier.router.reuse import TAIL_BYTES, Decision, Decisions, cached_in_body, cached_in_stream

log = logging.getLogger("kvtier.router")

POLICIES = ("kvtier", "round-robin")
ENGINE_HEADER = "x-kvtier-engine"
OVERHEAD_HEADER = "x-kvtier-router-ms"  # tokenize, key, score, until the request left
OVERHEAD_WINDOW = 2048
INLINE_CHARS = 32_000  # longer completion texts are tokenized off the event loop
# What a prefill engine's one-token request leaves out of the client's request.
_DECODE_ONLY = {"stream", "stream_options", "max_tokens", "max_completion_tokens", "min_tokens",
                "n", "best_of", "logprobs", "top_logprobs", "echo"}  # fmt: skip
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


@dataclass
class Routed:
    """One request's routing: what was predicted, for accounting when it comes back."""

    engine: Engine
    queued: int  # prefill tokens it adds to the engine's queue
    idle: bool  # nothing else was queued there (its TTFT measures the prefill rate)
    load_s: float
    prefill: Routed | None = None  # the prefill engine to go through first (disaggregated)
    counted: bool = False  # its queued tokens are in its engine's queue
    split: Split | None = None  # what the disaggregation decision weighed
    decision: Decision | None = None  # for the console, and routing precision


class Router:
    def __init__(
        self,
        workers: list[str],
        prompter: Prompter | None,
        policy: str = "kvtier",
        shared: SharedTier | None = None,
        prefill: list[str] | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; allowed: {', '.join(POLICIES)}")
        self.index = ChunkIndex()
        self.engines = EngineSet(workers, self.index, prefill)
        self.prompter = prompter
        self.policy = policy
        self.shared = shared
        self._cost: CostRouting | None = None
        self._turn = 0
        self._session: aiohttp.ClientSession | None = None
        self.overhead_s: deque[float] = deque(maxlen=OVERHEAD_WINDOW)
        self.retries = 0
        self.decisions: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()  # why each request went where it went
        self.made = Decisions()  # recent decisions, predicted vs reused tokens
        self.phases: dict[str, deque[float]] = {}  # where the overhead goes
        self._warming: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self._forward)
        app.router.add_post("/v1/chat/completions", self._forward)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/router/state", self._state)
        app.router.add_get("/router/chunks", self._chunks)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._start)
        # The console at /console/: the engines' /metrics and this router's state, scraped
        # while someone watches.
        metrics = [e.url + "/metrics" for e in self.engines.engines]
        Console(metrics, self._console_state, linger_s=LINGER_S).mount(app)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(connector=connector)
        await self.engines.start(self._session)
        self._warming = asyncio.create_task(self._find_shared())

    async def _find_shared(self) -> None:
        """The shared tier the engines report, connected before the first request needs it."""
        while self.shared is None:
            info = next((e.info for e in self.engines.engines if e.info), None)
            if info is not None:
                shared = self._shared_tier(info)
                if shared is not None:
                    await shared.warm()
                return
            await asyncio.sleep(0.25)

    def _shared_tier(self, info: dict[str, Any]) -> SharedTier | None:
        """The tier the engines say they share (from an engine's /kvtier/info), once."""
        if self.shared is None and info.get("shared"):
            first = info["shared"][0]
            self.shared = SharedTier(first["url"], first["prefix"], bool(first.get("cluster")))
        return self.shared

    async def _stop(self, app: web.Application) -> None:
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
        await self.engines.stop()
        if self._session is not None:
            await self._session.close()
        if self.shared is not None:
            await self.shared.close()

    # -- routing ---------------------------------------------------------------------------

    async def route(self, path: str, body: dict[str, Any]) -> tuple[list[Engine], Routed | None]:
        """Engines to try, best first, and the accounting of the first (with the prefill
        engine to go through first, in a disaggregated pod)."""
        healthy = self.engines.healthy()
        if not healthy:
            return [], None
        if self.policy == "round-robin" or self.prompter is None:
            self._turn += 1
            start = self._turn % len(healthy)
            return healthy[start:] + healthy[:start], None
        info = next((e.info for e in self.engines.engines if e.healthy and e.info), None)
        if info is None:  # no feed yet: balance on the queues alone
            return sorted(healthy, key=lambda e: e.queued_tokens), None
        chunk, block = int(info["chunk_tokens"]), int(info["block_size"])
        began = time.perf_counter()
        try:
            prompt_text = body.get("prompt")
            if isinstance(prompt_text, str) and len(prompt_text) > INLINE_CHARS:
                lead = Leading.of(await asyncio.to_thread(self.prompter.tokens, path, body))
            else:  # a chat tokenizes only its new pieces (their head, when long): no hop
                lead = self.prompter.leading(path, body, chunk)
        except PromptError:
            return sorted(healthy, key=lambda e: e.queued_tokens), None
        salt = body.get("cache_salt")
        namespace = Namespace(**info["namespace"], tenant_salt=salt or None)
        prompt = PromptKeys(lead.tokens, namespace, chunk, block, lead.complete)
        shared = self._shared_tier(info)
        keyed = time.perf_counter()
        if shared is not None:
            prompt.in_shared(await shared.holds(prompt.all_keys))
        if not lead.complete and (
            self._held_anywhere(prompt.hexes[-1:]) or prompt.shared[-1:] == [True]
        ):  # seen before after all: key all of it
            lead = lead.whole()
            prompt = PromptKeys(lead.tokens, namespace, chunk, block)
            if shared is not None:
                prompt.in_shared(await shared.holds(prompt.all_keys))
        asked = time.perf_counter()
        tokens = lead.total
        if self._cost is None:
            self._cost = CostRouting(int(info["bytes_per_token"]))
        views = [self._view(e, prompt) for e in healthy]
        decision = self._cost.choose(tokens, views)
        best = decision.best
        engine = healthy[decision.chosen]
        why = reason(views, decision.chosen)
        self.reasons[why] += 1
        rest = sorted(
            (e for e in healthy if e is not engine),
            key=lambda e: decision.estimates[healthy.index(e)].ttft_s,
        )
        order = [engine, *rest]
        self.index.predict(engine.url, prompt.saved)
        recompute = tokens - best.hit_tokens
        # Its TTFT measures the engine's prefill rate when nothing else was queued there and
        # the response's end is its first token (a stream, or a single token).
        one = body.get("stream") or 1 in (body.get("max_tokens"), body.get("max_completion_tokens"))
        idle = engine.queued_tokens == 0 and bool(one)
        routed = Routed(engine, recompute, idle, best.load_s)
        routed.decision = self.made.made(engine.url, why, tokens, best.hit_tokens)
        prefills = self.engines.healthy(prefill_only=True)
        if prefills:
            pviews = [self._view(e, prompt) for e in prefills]
            split = split_cost(self._cost, tokens, views[decision.chosen],
                               engine.in_flight, pviews, block)  # fmt: skip
            routed.split = split
            if split.prefill is not None:
                routed.decision.measured = False  # the decode engine reuses what P computed
                on = prefills[split.prefill]
                estimate = self._cost.estimate(tokens, pviews[split.prefill])
                self.index.predict(on.url, prompt.saved)
                routed.prefill = Routed(on, tokens - estimate.hit_tokens,
                                        on.queued_tokens == 0, estimate.load_s)  # fmt: skip
        done = time.perf_counter()
        for phase, seconds in (("tokenize_key", keyed - began), ("shared_tier", asked - keyed),
                               ("score", done - asked)):  # fmt: skip
            self.phases.setdefault(phase, deque(maxlen=OVERHEAD_WINDOW)).append(seconds)
        if not lead.complete:  # the rest, off the request's path
            task = asyncio.create_task(self._complete(lead, namespace, chunk, block, routed))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return order, routed

    def _held_anywhere(self, hexes: list[str]) -> bool:
        return any(self.index.kinds(e.url, hexes) for e in self.engines.engines)

    async def _complete(
        self, lead: Leading, namespace: Namespace, chunk: int, block: int, routed: Routed
    ) -> None:
        """A prompt routed on its leading tokens: all its tokens now, for the predictions
        (a burst of the same prompt follows the first) and the queue accounting."""
        assert lead.finish is not None
        try:
            whole = await asyncio.to_thread(lead.finish)
        except Exception:  # routing was done already; only its bookkeeping is coarser
            log.exception("kvtier router: tokenizing a prompt failed")
            return
        prompt = PromptKeys(whole, namespace, chunk, block)
        for part in (routed, routed.prefill):
            if part is None:
                continue
            self.index.predict(part.engine.url, prompt.saved)
            if part.queued > 0:
                delta = max(len(whole) - lead.total, -part.queued)
                part.queued += delta
                if part.counted:
                    part.engine.queued_tokens += delta

    def _view(self, engine: Engine, prompt: PromptKeys) -> EngineView:
        hits = held_hits(self.index, engine.url, prompt)
        return EngineView(engine.url, hits, engine.queued_tokens, self.engines.prefill_rate(engine),
                          engine.bandwidth)  # fmt: skip

    # -- handlers --------------------------------------------------------------------------

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}  # the engine answers a malformed request itself
        order, routed = await self.route(request.path, body)
        if not order:
            return _error(503, "no engine is available (all failed their health checks)")
        if routed is not None and routed.split is not None:
            self.decisions["prefill engine" if routed.prefill else "prefill skipped"] += 1
        overhead: float | None = None  # measured when the first engine is asked
        if routed is not None and routed.prefill is not None:
            overhead = time.perf_counter() - started
            self.overhead_s.append(overhead)
            hop = time.perf_counter()
            if await self._prefill(request, body, routed.prefill):
                routed.queued = 0  # the decode engine loads the prompt, computes nothing
            self.phases.setdefault("prefill_engine", deque(maxlen=OVERHEAD_WINDOW)).append(
                time.perf_counter() - hop
            )
        if routed is not None:
            routed.engine.queued_tokens += routed.queued
            routed.counted = True
        try:
            return await self._try(request, raw, order, routed, started, overhead)
        finally:
            if routed is not None and routed.queued:
                routed.engine.queued_tokens -= routed.queued
                routed.queued = 0

    async def _try(
        self,
        request: web.Request,
        raw: bytes,
        order: list[Engine],
        routed: Routed | None,
        started: float,
        overhead: float | None,
    ) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        last_error = ""
        for attempt, engine in enumerate(order):
            if attempt:
                self.retries += 1
            engine.routed += 1
            engine.in_flight += 1
            sent = time.perf_counter()
            if overhead is None:  # tokenize, key, score: until the request leaves
                overhead = sent - started
                self.overhead_s.append(overhead)
            try:
                async with self._session.post(
                    engine.url + request.path, data=raw, headers=headers
                ) as upstream:
                    return await self._relay(request, upstream, engine, routed, sent, overhead)
            except _NotStarted as exc:
                last_error = str(exc)
                self.engines.down(engine, last_error)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                self.engines.down(engine, last_error)
            finally:
                engine.in_flight -= 1
        return _error(502, f"every engine failed this request; the last said: {last_error}")

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        engine: Engine,
        routed: Routed | None,
        sent: float,
        overhead: float,
    ) -> web.StreamResponse:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        headers[ENGINE_HEADER] = engine.url  # where it ran: routing decisions can be audited
        headers[OVERHEAD_HEADER] = f"{overhead * 1000:.3f}"
        if "text/event-stream" not in upstream.headers.get("Content-Type", ""):
            try:
                body = await upstream.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise _NotStarted(f"{engine.url} dropped the request: {exc}") from None
            self._first_token(engine, routed, sent)
            self._reused(engine, routed, body, stream=False)
            return web.Response(body=body, status=upstream.status, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        first, tail = True, b""
        try:
            async for piece in upstream.content.iter_any():
                if first:
                    await response.prepare(request)
                    self._first_token(engine, routed, sent)
                    first = False
                await response.write(piece)
                tail = (tail + piece)[-TAIL_BYTES:]
        except (TimeoutError, aiohttp.ClientError) as exc:
            if first:
                raise _NotStarted(f"{engine.url} dropped the request: {exc}") from None
            self.engines.down(engine, f"stream broken: {exc}")
            event = {"error": {"message": f"the engine failed mid-stream: {exc}", "code": 502}}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if first:
            await response.prepare(request)
        self._reused(engine, routed, tail, stream=True)
        await response.write_eof()
        return response

    async def _prefill(self, request: web.Request, body: dict[str, Any], routed: Routed) -> bool:
        """The prompt on a prefill engine, for one token: its answer returns once the prompt's
        chunks are in the shared tier. False when that failed: the decode engine then
        computes the prompt itself (a request never fails for its prefill engine)."""
        assert self._session is not None
        engine = routed.engine
        one = {k: v for k, v in body.items() if k not in _DECODE_ONLY}
        one["max_tokens"], one["stream"] = 1, False
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _HOP_HEADERS and k.lower() != "content-type"}  # fmt: skip
        engine.queued_tokens += routed.queued
        routed.counted = True
        engine.in_flight += 1
        engine.routed += 1
        sent = time.perf_counter()
        why = ""
        try:
            async with self._session.post(engine.url + request.path, json=one,
                                          headers=headers) as upstream:  # fmt: skip
                answer = await upstream.read()
                if upstream.status == 200:
                    self._first_token(engine, routed, sent)
                    return True
                why = f"HTTP {upstream.status}: {answer[:200]!r}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            self.engines.down(engine, why)
        finally:
            engine.in_flight -= 1
            engine.queued_tokens -= routed.queued
            routed.queued = 0
        self.decisions["prefill failed"] += 1
        log.warning("kvtier router: prefill on %s failed (%s); decoding engine computes it",
                    engine.url, why)  # fmt: skip
        return False

    def _reused(self, engine: Engine, routed: Routed | None, answer: bytes, stream: bool) -> None:
        """What the engine reused of the prompt (routing precision); never fails a request."""
        if routed is None or routed.decision is None or routed.engine is not engine:
            return
        try:
            cached = cached_in_stream(answer) if stream else cached_in_body(answer)
            self.made.answered(routed.decision, cached)
        except Exception:
            log.exception("kvtier router: reading an answer's cached tokens failed")

    def _first_token(self, engine: Engine, routed: Routed | None, sent: float) -> None:
        if routed is None or routed.engine is not engine or not routed.queued:
            return
        if routed.idle:
            engine.measured_prefill(routed.queued, time.perf_counter() - sent - routed.load_s)
        engine.queued_tokens -= routed.queued
        routed.queued = 0

    async def _models(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        for engine in self.engines.healthy():
            try:
                async with self._session.get(engine.url + "/v1/models") as upstream:
                    body = await upstream.read()
                    ctype = upstream.headers.get("Content-Type", "application/json")
                    return web.Response(body=body, status=upstream.status, content_type=None,
                                        headers={"Content-Type": ctype})  # fmt: skip
            except aiohttp.ClientError as exc:
                self.engines.down(engine, str(exc))
        return _error(503, "no engine is available")

    async def _health(self, request: web.Request) -> web.StreamResponse:
        if self.engines.healthy():
            return web.Response(text="ok")
        return _error(503, "no engine is available")

    async def _console_state(self) -> dict[str, Any]:
        return self.state()

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state())

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        """Prometheus text: the router's state as ``kvtier:router_*`` series."""
        body, content_type = router_metrics(self.state())
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _chunks(self, request: web.Request) -> web.StreamResponse:
        """``?keys=HEX,HEX``: where the index says each chunk is (engine -> tier kinds)."""
        keys = [k for k in request.query.get("keys", "").split(",") if k]
        if not keys or any(len(k) != 32 for k in keys):
            return _error(400, "keys: expected chunk keys as 32 hex digits, comma-separated")
        return web.json_response({key: self.index.holders(key) for key in keys})

    def state(self) -> dict[str, Any]:
        ordered = sorted(self.overhead_s)
        p50, p99 = quantile(ordered, 0.5), quantile(ordered, 0.99)
        return {
            "policy": self.policy,
            "engines": [e.state() for e in self.engines.engines],
            "index": {"chunks": len(self.index), "per_engine": self.index.counts(),
                      "staleness": self.index.staleness.summary(),
                      "resyncs": self.index.resyncs},
            "shared": self.shared.url if self.shared else None,
            "shared_late_answers": self.shared.late if self.shared else 0,
            "overhead_ms_p50": round(p50 * 1000, 3),
            "overhead_ms_p99": round(p99 * 1000, 3),
            "overhead_phases_ms_p50": {
                name: round(quantile(sorted(v), 0.5) * 1000, 3) for name, v in self.phases.items()
            },
            "overhead_phases_ms_p99": {
                name: round(quantile(sorted(v), 0.99) * 1000, 3) for name, v in self.phases.items()
            },
            "retries": self.retries,
            "reasons": dict(self.reasons),
            "decisions": dict(self.decisions),
            "reuse": self.made.state(),
            "recent": self.made.recent_state(),
        }  # fmt: skip


class _NotStarted(Exception):
    """The engine failed before anything reached the client: another may serve it."""


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "router_error", "code": status}}
    return web.json_response(body, status=status)
