"""The tenant gate on an engine's HTTP port: ASGI middleware in vLLM's API server that
authenticates every request with the tenants file and sets its ``cache_salt`` from its tenant.

``kvtier serve --tenants FILE`` gives vLLM ``--middleware`` with :class:`TenantGate` and the
file's path in ``KVTIER_TENANTS_FILE`` (set at that edge only). What it does, per request:

- ``/health``, ``/ping``, ``/version``, ``/v1/models``, ``/metrics``: open (no prompt, no
  cache). Everything else needs a key the file lists (401 otherwise), or comes from the
  ``anonymous`` tenant if the file admits requests without a key.
- ``/v1/completions`` and ``/v1/chat/completions``: the JSON body's ``cache_salt`` becomes the
  salt derived from the tenant and the client's own salt (:meth:`kvtier.tenants.Tenants.salt`):
  it divides vLLM's prefix cache and kvtier's chunks alike, so a client can never name another
  tenant's salt. ``/tokenize`` and ``/detokenize``: authenticated, as they are.
- Any other path is refused (404): an endpoint that runs the model without this salt, or keeps
  a response another tenant could fetch (``/v1/responses``), would reach across tenants.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kvtier.tenants import Tenants, Unauthorized, load_tenants

TENANTS_ENV = "KVTIER_TENANTS_FILE"
OPEN = frozenset({"/health", "/ping", "/version", "/v1/models", "/metrics"})
SALTED = frozenset({"/v1/completions", "/v1/chat/completions"})
AS_IS = frozenset({"/tokenize", "/detokenize"})
MAX_BODY = 64 << 20  # bytes of a request body read to set its salt

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class TenantGate:
    """ASGI middleware; a pass-through where no tenants file is given."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        path = os.environ.get(TENANTS_ENV)
        self.tenants: Tenants | None = load_tenants(path) if path else None
        if self.tenants is not None and self.tenants.unkeyed_warning:
            logging.getLogger("kvtier").warning("kvtier: %s", self.tenants.unkeyed_warning)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.tenants is None or scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets: no tenant check written for them
            await send({"type": "websocket.close", "code": 1008})
            return None
        path = scope.get("path", "")
        if path in OPEN or path.startswith("/kvtier/"):
            return await self.app(scope, receive, send)
        if path not in SALTED and path not in AS_IS:
            return await _reply(send, 404, f"{path} is not served by a server with tenants")
        given = _headers(scope, b"authorization")
        if len(given) > 1:  # which one names the tenant? Neither is trusted.
            return await _reply(send, 401, "more than one Authorization header", "authentication")
        try:
            tenant = self.tenants.identify(given[0] if given else None)
        except Unauthorized as exc:
            return await _reply(send, 401, str(exc), "authentication")
        if path in AS_IS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body = await _body(receive)
        if body is None:
            return await _reply(send, 413, f"request body over {MAX_BODY >> 20} MiB")
        try:
            request = json.loads(body)
        except ValueError:
            return await _reply(send, 400, "expected a JSON body")
        if not isinstance(request, dict):
            return await _reply(send, 400, "expected a JSON object")
        client_salt = request.get("cache_salt")
        if client_salt is not None and not isinstance(client_salt, str):
            return await _reply(send, 400, "cache_salt: expected a string")
        request["cache_salt"] = self.tenants.salt(tenant, client_salt)
        raw = json.dumps(request).encode()
        await self.app(_with_length(scope, len(raw)), _once(raw, receive), send)
        return None


def _headers(scope: Scope, name: bytes) -> list[str]:
    """Every value of header ``name`` (lower case) the request carries."""
    return [
        bytes(value).decode("latin-1")
        for key, value in scope.get("headers", [])
        if bytes(key).lower() == name
    ]


async def _body(receive: Receive) -> bytes | None:
    """The whole request body (None: over MAX_BODY)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def _once(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` first, then the connection's own messages (a
    streaming response listens on it for the client going away)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def _reply(send: Send, status: int, message: str, kind: str = "invalid_request") -> None:
    error = {"message": message, "type": f"{kind}_error", "code": status}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
