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
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvtier.console.history import History, Point
from kvtier.console.scrape import Scrape, ScrapeError

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
        """One round: every engine's page at once, then the router's state."""
        assert self._session is not None and self._round is not None, "not started"
        async with self._round:
            pages = await asyncio.gather(*(self._one(url) for url in self.metrics))
            point = Point(time.time(), {})
            for url, (scrape, error) in zip(self.metrics, pages, strict=True):
                engine = url.removesuffix("/metrics")
                point.engines[engine] = scrape
                if error:
                    point.errors[engine] = error
            if self._state is not None:
                self._router = await self._state()
            self.history.add(point)

    async def _one(self, url: str) -> tuple[Scrape | None, str | None]:
        assert self._session is not None
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None, f"HTTP {response.status} from {url}"
                return Scrape.parse(await response.text()), None
        except (TimeoutError, aiohttp.ClientError, ScrapeError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def _watched(self) -> bool:
        """Note a viewer; True when the console had stopped scraping for want of one."""
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
        self._watched()
        return web.FileResponse(STATIC / "console.html")

    async def _data(self, request: web.Request) -> web.StreamResponse:
        if self._watched() or not self.history.points:
            await self.scrape()  # a first look, or the first after a pause: no empty page
        body = self.history.view(self._router)
        body["interval_s"] = self.interval_s
        body["sources"] = self.metrics
        return web.json_response(body)
