"""``kvtier router``: an OpenAI-compatible front for several engines that sends each request
where its context already is.

This is the HTTP layer: each request is handed to :class:`~.route.Routing` (tokenize, key, find
the chunks, price the engines, choose), then forwarded unchanged; the engine's answer, errors
included, comes back unchanged. A request's queued prefill tokens are its :class:`~.route.Route`'s
to count, from the moment it is forwarded until its first token.

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
from contextlib import nullcontext
from typing import Any

import aiohttp
from aiohttp import web

from kvtier.console.app import LINGER_S, Console
from kvtier.router.engines import Engine, EngineSet
from kvtier.router.index import ChunkIndex, quantile
from kvtier.router.lookup import SharedTier
from kvtier.router.metrics import router_metrics
from kvtier.router.prompts import Prompter
from kvtier.router.reuse import TAIL_BYTES, cached_in_body, cached_in_stream
from kvtier.router.route import POLICIES, Route, Routing
from kvtier.tenants import Tenants, Unauthorized

log = logging.getLogger("kvtier.router")

__all__ = ["POLICIES", "Router"]
ENGINE_HEADER = "x-kvtier-engine"
OVERHEAD_HEADER = "x-kvtier-router-ms"  # tokenize, key, score, until the request left
OVERHEAD_WINDOW = 2048
# What a prefill engine's one-token request leaves out of the client's request.
_DECODE_ONLY = {
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "n",
    "best_of",
    "logprobs",
    "top_logprobs",
    "echo",
}
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


class Router:
    def __init__(
        self,
        workers: list[str],
        prompter: Prompter | None,
        policy: str = "kvtier",
        shared: SharedTier | None = None,
        prefill: list[str] | None = None,
        tenants: Tenants | None = None,
    ):
        self.tenants = tenants  # None: one trust domain, the client's cache_salt as it is
        self.index = ChunkIndex()
        self.engines = EngineSet(workers, self.index, prefill)
        self.routing = Routing(self.engines, self.index, prompter, policy, shared)
        self._session: aiohttp.ClientSession | None = None
        self.overhead_s: deque[float] = deque(maxlen=OVERHEAD_WINDOW)
        self.retries = 0
        self.decisions: Counter[str] = Counter()
        self._warming: asyncio.Task[None] | None = None

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
        while self.routing.shared is None:
            info = next((e.info for e in self.engines.engines if e.info), None)
            if info is not None:
                shared = self.routing.shared_tier(info)
                if shared is not None:
                    await shared.warm()
                return
            await asyncio.sleep(0.25)

    async def _stop(self, app: web.Application) -> None:
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
        await self.engines.stop()
        if self._session is not None:
            await self._session.close()
        if self.routing.shared is not None:
            await self.routing.shared.close()

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
        problem = _salt_problem(body.get("cache_salt"), derived=self.tenants is not None)
        if problem:
            return _error(400, problem)
        keyed = body
        if self.tenants is not None:
            # The engine authenticates the same key and derives the same salt from the body
            # it receives unchanged; the router keys the prompt as the engine will.
            given = request.headers.getall("Authorization", [])
            if len(given) > 1:  # which one names the tenant? Neither is trusted.
                return _error(401, "more than one Authorization header")
            try:
                tenant = self.tenants.identify(given[0] if given else None)
            except Unauthorized as exc:
                return _error(401, str(exc))
            keyed = {**body, "cache_salt": self.tenants.salt(tenant, body.get("cache_salt"))}
        try:
            order, route = await self.routing.route(request.path, keyed)
        except Exception:  # a fault in routing costs the request its placement, not an answer
            log.exception("kvtier router: routing %s failed; sent by queue length", request.path)
            order, route = sorted(self.engines.healthy(), key=lambda e: e.queued_tokens), None
        if not order:
            return _error(503, "no engine is available (all failed their health checks)")
        if route is not None and route.split is not None:
            self.decisions["prefill engine" if route.prefill else "prefill skipped"] += 1
        overhead: float | None = None  # measured when the first engine is asked
        if route is not None and route.prefill is not None:
            overhead = time.perf_counter() - started
            self.overhead_s.append(overhead)
            hop = time.perf_counter()
            if await self._prefill(request, body, route.prefill):
                route.computes_nothing()  # the decode engine loads the prompt
            self.routing.phase("prefill_engine", time.perf_counter() - hop)
        with route.in_queue() if route is not None else nullcontext():
            return await self._try(request, raw, order, route, started, overhead)

    async def _try(
        self,
        request: web.Request,
        raw: bytes,
        order: list[Engine],
        route: Route | None,
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
                overhead = sent - started - (route.waited_s if route is not None else 0.0)
                self.overhead_s.append(overhead)
            try:
                async with self._session.post(
                    engine.url + request.path, data=raw, headers=headers
                ) as upstream:
                    return await self._relay(request, upstream, engine, route, sent, overhead)
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
        route: Route | None,
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
            if route is not None:
                route.first_token(engine, sent)
            self._reused(engine, route, body, stream=False)
            return web.Response(body=body, status=upstream.status, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        first, tail = True, b""
        try:
            async for piece in upstream.content.iter_any():
                if first:
                    await response.prepare(request)
                    if route is not None:
                        route.first_token(engine, sent)
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
        self._reused(engine, route, tail, stream=True)
        await response.write_eof()
        return response

    async def _prefill(self, request: web.Request, body: dict[str, Any], route: Route) -> bool:
        """The prompt on a prefill engine, for one token: its answer returns once the prompt's
        chunks are in the shared tier. False when that failed: the decode engine then
        computes the prompt itself (a request never fails for its prefill engine)."""
        assert self._session is not None
        engine = route.engine
        one = {k: v for k, v in body.items() if k not in _DECODE_ONLY}
        one["max_tokens"], one["stream"] = 1, False
        skip = _HOP_HEADERS | {"content-type"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        engine.in_flight += 1
        engine.routed += 1
        sent = time.perf_counter()
        why = ""
        try:
            with route.in_queue():
                async with self._session.post(
                    engine.url + request.path, json=one, headers=headers
                ) as upstream:
                    answer = await upstream.read()
                    if upstream.status == 200:
                        route.first_token(engine, sent)
                        return True
                    why = f"HTTP {upstream.status}: {answer[:200]!r}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            self.engines.down(engine, why)
        finally:
            engine.in_flight -= 1
        self.decisions["prefill failed"] += 1
        log.warning(
            "kvtier router: prefill on %s failed (%s); decoding engine computes it", engine.url, why
        )
        return False

    def _reused(self, engine: Engine, route: Route | None, answer: bytes, stream: bool) -> None:
        """What the engine reused of the prompt (routing precision); never fails a request."""
        if route is None or route.decision is None or route.engine is not engine:
            return
        try:
            cached = cached_in_stream(answer) if stream else cached_in_body(answer)
            self.routing.reuse.answered(route.decision, cached)
        except Exception:
            log.exception("kvtier router: reading an answer's cached tokens failed")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        for engine in self.engines.healthy():
            try:
                async with self._session.get(engine.url + "/v1/models") as upstream:
                    body = await upstream.read()
                    ctype = upstream.headers.get("Content-Type", "application/json")
                    return web.Response(
                        body=body,
                        status=upstream.status,
                        content_type=None,
                        headers={"Content-Type": ctype},
                    )
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
        routing, shared = self.routing, self.routing.shared
        ordered = sorted(self.overhead_s)
        p50, p99 = quantile(ordered, 0.5), quantile(ordered, 0.99)
        phases = {name: sorted(v) for name, v in routing.phases.items()}
        index = {
            "chunks": len(self.index),
            "per_engine": self.index.counts(),
            "staleness": self.index.staleness.summary(),
            "resyncs": self.index.resyncs,
        }
        return {
            "policy": routing.policy,
            "engines": [e.state() for e in self.engines.engines],
            "index": index,
            "shared": shared.url if shared else None,
            "shared_late_answers": shared.late if shared else 0,
            "overhead_ms_p50": round(p50 * 1000, 3),
            "overhead_ms_p99": round(p99 * 1000, 3),
            "overhead_phases_ms_p50": {
                name: round(quantile(v, 0.5) * 1000, 3) for name, v in phases.items()
            },
            "overhead_phases_ms_p99": {
                name: round(quantile(v, 0.99) * 1000, 3) for name, v in phases.items()
            },
            "retries": self.retries,
            "reasons": dict(routing.reasons),
            "decisions": dict(self.decisions),
            "reuse": routing.reuse.state(),
            "recent": routing.reuse.recent_state(),
        }


class _NotStarted(Exception):
    """The engine failed before anything reached the client: another may serve it."""


# vLLM's own rule for a client's cache_salt (vllm/entrypoints/generate/base/protocol.py).
SALT_MAX_CHARS = 128
SALT_FORBIDDEN = "@/\\\0"


def _salt_problem(salt: object, derived: bool) -> str | None:
    """Why the router refuses a request's ``cache_salt`` (None: it does not), before any key
    is derived from it: what the engine would refuse with 400, the router refuses with 400.
    With tenants the salt the engine sees is derived from it, so any string goes."""
    if salt is None:
        return None
    if not isinstance(salt, str):
        return f"cache_salt: expected a string, got {type(salt).__name__}"
    if derived:
        return None
    if not salt or len(salt) > SALT_MAX_CHARS or any(c in SALT_FORBIDDEN for c in salt):
        return (
            f"cache_salt: a non-empty string of at most {SALT_MAX_CHARS} characters,"
            " without '@', '/', '\\' or NUL"
        )
    return None


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "router_error", "code": status}}
    return web.json_response(body, status=status)
