"""``/kvtier/...`` on an engine's own HTTP port: vLLM middleware that forwards to the feed.

The store, and so its :class:`~kvtier.integrations.feed.EventFeed`, lives in vLLM's worker
process (or its engine core); the OpenAI server runs in another. ``kvtier serve`` gives vLLM
``--middleware`` with this function and tells both processes the feed's loopback port
(``KVTIER_FEED_PORT``, set at that edge only), so a router needs nothing but the engine's URL.
It also counts the completion requests on their way to the engine
(:mod:`kvtier.integrations.front`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

from kvtier.integrations.front import COUNTED, Front

FEED_PORT_ENV = "KVTIER_FEED_PORT"
PREFIX = "/kvtier/"

_session: Any = None


@functools.cache
def _front() -> Front | None:
    """The counters ``kvtier serve`` made for this API server (None: started otherwise)."""
    return Front.from_env()


async def _feed(path: str) -> tuple[int, bytes]:
    """GET ``path`` from the worker's feed: (status, body); raises aiohttp.ClientError."""
    import aiohttp

    global _session
    if _session is None:
        _session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    url = f"http://127.0.0.1:{os.environ.get(FEED_PORT_ENV)}{path}"
    async with _session.get(url) as upstream:
        return upstream.status, await upstream.read()


async def _refresh_states() -> None:
    """Before vLLM renders ``/metrics``: the tiers' occupancy from the worker, now (an idle
    engine's steps report nothing; see KvtierPromMetrics.refresh). Quietly skipped when the
    worker does not answer within a second."""
    import asyncio
    import json

    import aiohttp

    from kvtier.integrations.vllm.metrics import LIVE

    if not LIVE:
        return
    try:
        status, body = await asyncio.wait_for(_feed("/kvtier/states"), 1.0)
    except (aiohttp.ClientError, TimeoutError):
        return
    if status != 200:
        return
    try:
        states = json.loads(body)
    except ValueError:
        return
    for series in LIVE:
        series.refresh(states)


async def forward(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """Starlette HTTP middleware: ``/kvtier/*`` to the feed, ``/metrics`` with the tiers'
    occupancy read first, completions counted on their way, anything else to vLLM."""
    path = request.url.path
    if path.startswith(PREFIX):
        return await _to_feed(request)
    if path == "/metrics" and os.environ.get(FEED_PORT_ENV):
        await _refresh_states()
        return await call_next(request)
    front = _front()
    if front is None or request.method != "POST" or path not in COUNTED:
        return await call_next(request)
    front.received()
    try:
        response = await call_next(request)
    except BaseException:
        front.refused()
        raise
    if response.status_code >= 400:  # refused before the engine got it
        front.refused()
    return response


async def _to_feed(request: Any) -> Any:
    import aiohttp
    from starlette.responses import JSONResponse, Response

    if not os.environ.get(FEED_PORT_ENV):
        return JSONResponse({"error": "this engine runs without kvtier's feed"}, status_code=404)
    path = request.url.path + ("?" + request.url.query if request.url.query else "")
    try:
        status, body = await _feed(path)
        return Response(body, status, media_type="application/json")
    except aiohttp.ClientError as exc:  # the worker is still starting, or gone
        return JSONResponse({"error": f"kvtier feed unavailable: {exc}"}, status_code=503)
