"""Helpers of the pod tests: a `kvtier pod` process started from the README's command line,
requests through it, and waiting for things."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.redis_process import free_port

# What asking a server that is not listening yet raises: refused, or, when the kernel gave
# the client the server's own port as its source port, a connection to itself that reads back
# its own request (BadStatusLine).
NOT_UP = (OSError, http.client.HTTPException, ValueError)

MODEL = "SmolLM2-135M-Instruct"
README = Path(__file__).parent.parent / "README.md"


class PodProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.engine_port = 0

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/router/state", timeout=10) as r:
            return dict(json.load(r))

    def engines(self) -> list[str]:
        return [e["url"] for e in self.state()["engines"]]


def post(
    base: str, path: str, body: dict[str, Any], timeout: float = 300
) -> tuple[dict[str, Any], str]:
    """(reply, the engine that answered, from the router's header)."""
    request = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.load(r), r.headers.get("x-kvtier-engine", "")


def complete(pod: PodProcess, prompt: str, max_tokens: int = 1) -> tuple[dict[str, Any], str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    return post(pod.url, "/v1/completions", body)


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return dict(json.load(r))


def engine_pids(url: str) -> list[str]:
    """The vLLM API server of the engine at ``url`` (each leads its own session)."""
    port = url.rsplit(":", 1)[1]
    found = subprocess.run(
        ["pgrep", "-f", f"vllm_main.*--port {port}"], capture_output=True, text=True
    )
    return found.stdout.split()


def text(tag: str, words: int) -> str:
    return " ".join(f"{tag} item{i}" for i in range(words))


def wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def readme_line(command: str) -> str:
    """The README's ``command`` line (the pod's or the router's), comment dropped."""
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    line = next(ln for b in blocks for ln in b.splitlines() if ln.startswith(command))
    return line.split("#", 1)[0]


def two_free_ports() -> int:
    """A port p with p + 1 free too (the pod's engines take consecutive ports)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


def as_run(line: str, engine_port: int, router_port: int) -> list[str]:
    """A README command line with its ports moved to free ones, run from this checkout."""
    line = line.replace("8001", str(engine_port)).replace("8002", str(engine_port + 1))
    line = line.replace("9000", str(router_port))
    words = shlex.split(line)
    assert words[0] == "kvtier"
    return [sys.executable, "-m", "kvtier.cli.main", *words[1:]]


@contextlib.contextmanager
def running_pod(command: list[str], port: int, log: Path) -> Iterator[PodProcess]:
    """``command`` (a pod listening on ``port``) until every engine is up and synced."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pod = PodProcess(proc, port, log)
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return all(e["healthy"] and e["synced"] for e in pod.state()["engines"])
            except NOT_UP:
                return False

        wait_for(up, 400, "the pod to start")
        yield pod
    finally:
        if proc.poll() is None:  # as Ctrl-C: the pod stops its engines (their own sessions)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def readme_pod(factory: pytest.TempPathFactory, line: str, *options: str) -> Iterator[PodProcess]:
    """The README's pod command starting with ``line``, as written, with free ports, a state
    directory of its own and ``options``."""
    state = factory.mktemp("pod")
    port, engine_port = free_port(), two_free_ports()
    command = [
        *as_run(readme_line(line), engine_port, 0),
        "--port",
        str(port),
        "--state",
        str(state),
        "--dram",
        "512MiB",
        *options,
    ]
    with running_pod(command, port, state / "pod.log") as started:
        started.engine_port = engine_port
        yield started
