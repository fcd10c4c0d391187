"""The live console: a web page (``/console/``) and the JSON it draws (``/console/api/data``),
made from the engines' ``/metrics`` scraped every :data:`INTERVAL_S` seconds and, in a pod, the
router's state.

The router mounts it on its own app (its engines are the sources; it scrapes only while
someone watched in the last :data:`LINGER_S` seconds); ``kvtier console --metrics URL ...``
serves it alone. The charts are drawn by uPlot, installed from npm as package data
(``vendor/``) by ``scripts/install.sh``: nothing is fetched from the network by the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvtier.console.history import SERIES, History, Point
from kvtier.console.scrape import Scrape

log = logging.getLogger("kvtier")

INTERVAL_S = 2.0
LINGER_S = 600.0  # the router scrapes while someone watched this recently
SCRAPE_TIMEOUT_S = 1.5
HERE = Path(__file__).parent
STATIC = HERE / "static"
VENDOR = HERE / "vendor"
VENDOR_FILES = ("uPlot.iife.min.js", "uPlot.min.css")

StateSource = Callable[[], Awaitable[dict[str, Any] | None]]


def missing_vendor() -> list[str]:
    return [name for name in VENDOR_FILES if not (VENDOR / name).is_file()]


class Console:
    """Scrapes ``metrics`` (each engine's ``/metrics`` URL) and keeps their history.

    ``state``: the router's state (in a pod), fetched with each scrape. ``linger_s``: scrape
    only while the page was asked for within this many seconds (None: always).
    """

    def __init__(
        self,
        metrics: list[str],
        state: StateSource | None = None,
        interval_s: float = INTERVAL_S,
        linger_s: float | None = None,
    ):
        self.metrics = metrics
        self._state = state
        self.interval_s = interval_s
        self._linger_s = linger_s
        self._wanted_until = float("inf") if linger_s is None else float("-inf")
        self.history = History()
        self._router: dict[str, Any] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._round: asyncio.Lock | None = None
        self._body: str | None = None  # the page's data, made at the last scrape

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/console", self._redirect)
        app.router.add_get("/console/", self._page)
        app.router.add_get("/console/api/data", self._data)
        app.router.add_static("/console/static", STATIC)
        if VENDOR.is_dir():
            app.router.add_static("/console/vendor", VENDOR)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        self._round = asyncio.Lock()
        self._task = asyncio.create_task(self._loop())

    async def _stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            if time.monotonic() < self._wanted_until:
                try:
                    await self.scrape()
                except Exception:  # the console never takes its server down
                    log.exception("kvtier console: a scrape failed")
            await asyncio.sleep(self.interval_s)

    async def scrape(self) -> None:
        """One round: every engine's page at once, then the router's state; the page's data
        made once per round (every viewer gets the same)."""
        assert self._session is not None and self._round is not None, "not started"
        async with self._round:
            last = self.history.points[-1].mono if self.history.points else None
            if last is None:
                last = float("-inf")
            if time.monotonic() - last < self.interval_s / 2:
                return  # a round just ended: intervals this short only add noise
            pages = await asyncio.gather(*(self._one(url) for url in self.metrics))
            point = Point(time.time(), {}, mono=time.monotonic())
            for url, (scrape, error) in zip(self.metrics, pages, strict=True):
                engine = url.removesuffix("/metrics")
                point.engines[engine] = scrape
                if error:
                    point.errors[engine] = error
            if self._state is not None:
                self._router = await self._state()
            self.history.add(point)
            view = await asyncio.to_thread(self.history.view, self._router)
            view.update(interval_s=self.interval_s, sources=self.metrics)
            self._body = json.dumps(view, allow_nan=False)

    async def _one(self, url: str) -> tuple[Scrape | None, str | None]:
        """One engine's page, parsed off the event loop (the router's requests go on)."""
        assert self._session is not None
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None, f"HTTP {response.status} from {url}"
                text = await response.text(errors="replace")
            return await asyncio.to_thread(Scrape.parse, text, SERIES), None
        except Exception as exc:  # that engine's error, shown; never the whole round's
            return None, f"{type(exc).__name__}: {exc}"

    def _watched(self) -> bool:
        """Note a viewer (a poll of the data); True when the console had stopped scraping for
        want of one."""
        if self._linger_s is None:
            return False
        idle = time.monotonic() >= self._wanted_until
        self._wanted_until = time.monotonic() + self._linger_s
        return idle

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/console/")

    async def _page(self, request: web.Request) -> web.StreamResponse:
        missing = missing_vendor()
        if missing:
            return web.Response(
                status=500,
                text=f"kvtier console: the charting library is not installed ({', '.join(missing)}"
                f" missing in {VENDOR}); run `make install` (scripts/install.sh installs uPlot"
                " from npm)",
            )
        return web.FileResponse(STATIC / "console.html")

    async def _data(self, request: web.Request) -> web.StreamResponse:
        if self._watched():  # the first look after a pause: what was seen before is stale
            assert self._round is not None, "not started"
            async with self._round:  # not while a round reads the history
                self.history.clear()
                self._body = None
        if self._body is None:
            await self.scrape()  # no empty page: this round's data now
        if self._body is None:
            return web.Response(status=503, text="kvtier console: no data yet, try again")
        return web.Response(text=self._body, content_type="application/json")


def router_state_source(router: str) -> StateSource:
    """The state of the router at ``router`` (its ``/router/state``); None while it is down."""
    url = router.rstrip("/") + "/router/state"

    async def router_state() -> dict[str, Any] | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as session,
                session.get(url) as response,
            ):
                return dict(await response.json()) if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    return router_state


def serve_console(metrics: list[str], router: str | None, host: str, port: int) -> None:
    """``kvtier console``: the console alone, scraping ``metrics`` (and ``router``'s state),
    until SIGINT/SIGTERM."""
    app = web.Application()
    Console(metrics, router_state_source(router) if router else None).mount(app)
    print(
        f"kvtier console: http://{host}:{port}/console/ (scraping {', '.join(metrics)})",
        file=sys.stderr,
        flush=True,
    )
    web.run_app(app, host=host, port=port, print=None, access_log=None)
