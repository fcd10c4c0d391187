"""A real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol: open a
page, evaluate JavaScript in it, take a screenshot."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect


class BrowserError(RuntimeError):
    pass


class Page:
    def __init__(self, socket: ClientConnection):
        self._socket = socket
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; events that arrive meanwhile are skipped."""
        ident = next(self._ids)
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=60))
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll ``expression`` until it is true; one that throws (the page still loading) is
        not true yet."""
        deadline = time.monotonic() + timeout_s
        error = ""
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError as exc:
                value, error = None, str(exc)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what} {error}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))


@contextlib.contextmanager
def chromium_page(url: str, width: int = 1400, height: int = 1000) -> Iterator[Page]:
    """``url`` open in a new headless Chromium."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise BrowserError("chromium is not installed (make test installs it with apt-get)")
    profiles = tempfile.TemporaryDirectory(prefix="kvtier-chromium-", ignore_cleanup_errors=True)
    with profiles as profile:
        proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            active = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not active.exists() or not active.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BrowserError("chromium did not start its DevTools endpoint")
                time.sleep(0.1)
            port = active.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = [t for t in json.load(r) if t.get("type") == "page"]
            with connect(targets[0]["webSocketDebuggerUrl"], max_size=64 << 20) as socket:
                page = Page(socket)
                page.call("Page.enable")
                page.call("Page.navigate", url=url)
                yield page
        finally:  # chromium and its helper processes (its own session)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
