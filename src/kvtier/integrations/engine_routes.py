"""``/kvtier/...`` on an engine's own HTTP port: vLLM middleware that forwards to the feed.

The store, and so its :class:`~kvtier.integrations.feed.EventFeed`, lives in vLLM's worker
process (or its engine core); the OpenAI server runs in another. ``kvtier serve`` gives vLLM
``--middleware`` with this function and tells both processes the feed's loopback port
(``KVTIER_FEED_PORT``, set at that edge only), so a router needs nothing but the engine's URL.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

FEED_PORT_ENV = "KVTIER_FEED_PORT"
PREFIX = "/kvtier/"

_session: Any = None


async def forward(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """Starlette HTTP middleware: ``/kvtier/*`` to the feed, anything else to vLLM."""
    if not request.url.path.startswith(PREFIX):
        return await call_next(request)
    import aiohttp
    from starlette.responses import JSONResponse, Response

    port = os.environ.get(FEED_PORT_ENV)
    if not port:
        return JSONResponse({"error": "this engine runs without kvtier's feed"}, status_code=404)
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    url = f"http://127.0.0.1:{port}{request.url.path}"
    if request.url.query:
        url += "?" + request.url.query
    try:
        async with _session.get(url) as upstream:
            body = await upstream.read()
            return Response(body, upstream.status, media_type="application/json")
    except aiohttp.ClientError as exc:  # the worker is still starting, or gone
        return JSONResponse({"error": f"kvtier feed unavailable: {exc}"}, status_code=503)
