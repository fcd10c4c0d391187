"""Running ``kvtier router`` (and a pod's router): the router for a list of engines, served
until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kvtier.errors import KvtierError
from kvtier.router.app import Router
from kvtier.tenants import load_tenants


def make_router(
    workers: list[str],
    policy: str,
    tokenizer: str | Path | None,
    prefill: Sequence[str] = (),
    tenants: str | Path | None = None,
) -> Router:
    """The router; it finds the shared tier in the engines' feeds (``/kvtier/info``).
    ``tokenizer``: the engines' model directory (None: the embedded model's); ``tenants``:
    the tenants file the engines were given too (None: one trust domain)."""
    from kvtier.router.prompts import Prompter

    if tokenizer is None:
        from kvtier.integrations.model import prepare_default_model

        tokenizer = prepare_default_model()
    if prefill and policy != "kvtier":
        raise KvtierError("prefill engines need --policy kvtier (it decides what to prefill where)")
    prompter = Prompter(tokenizer) if policy == "kvtier" else None
    known = load_tenants(tenants) if tenants else None
    if known is not None and known.unkeyed_warning:
        print(f"kvtier router: warning: {known.unkeyed_warning}", file=sys.stderr)
    return Router(workers, prompter, policy, prefill=list(prefill), tenants=known)


def serve_router(router: Router, host: str, port: int) -> None:
    """Run ``router`` until SIGINT/SIGTERM."""
    from aiohttp import web

    logging.getLogger("kvtier.router").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    print(f"kvtier router: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    web.run_app(router.app(), host=host, port=port, print=None, access_log=None)
