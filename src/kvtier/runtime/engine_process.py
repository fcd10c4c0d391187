"""An OpenAI-compatible vLLM server run as a child process on loopback: ``kvtier serve`` or
plain vLLM with the same flags. Used by ``kvtier bench ttft`` and the tests, which measure
what users see: requests over HTTP to an engine in its own processes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from kvtier.errors import KvtierError
from kvtier.integrations.engine_dtype import DtypeChoice
from kvtier.integrations.engine_layout import EngineLayout, choose_layout, has_gpu
from kvtier.integrations.model import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class Completion:
    """One completion as the client saw it."""

    text: str
    seconds: float  # request sent -> whole response read (with max_tokens=1: the TTFT)
    prompt_tokens: int
    cached_tokens: int | None  # prompt tokens the engine did not compute (vLLM's or kvtier's)
    tokens: tuple[str, ...] = ()  # the answer's tokens, where the request asked for logprobs

    @property
    def recomputed_tokens(self) -> int | None:
        return None if self.cached_tokens is None else self.prompt_tokens - self.cached_tokens


def kvtier_serve_command(port: int, *options: str) -> list[str]:
    """``kvtier serve`` on ``port`` with ``options`` (kvtier's or vLLM's)."""
    return [sys.executable, "-m", "kvtier.cli.main", "serve", "--port", str(port), *options]


# vLLM on CPU binds its compute threads to cores and keeps one core for its engine-core
# process, except when a KV connector is configured: then it wants two, which a 2-core machine
# does not have, so it keeps none and computes on both. A plain server would prefill with half
# the cores of a server with any connector (measured here: ~1.9x slower cold prefills); this
# gives it the same cores, so that cold_vllm and cold compare like with like.
# With no core kept back, it also runs in the layout `kvtier serve` picks on such a host (the
# worker inside the engine core, kvtier.integrations.engine_layout): same processes, same cores.
PLAIN_RESERVED = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def plain_layout(options: Sequence[str]) -> EngineLayout:
    return choose_layout(options, {**os.environ, **PLAIN_RESERVED}, 1, has_gpu())


def plain_vllm_env(*options: str) -> dict[str, str]:
    """The environment for :func:`plain_vllm_command` with ``options``."""
    return {**PLAIN_RESERVED, **plain_layout(options).env()}


def plain_vllm_command(port: int, *options: str, dtype: DtypeChoice | None = None) -> list[str]:
    """vLLM's own OpenAI server with the flags ``kvtier serve`` gives it, minus the connector
    (run it with :func:`plain_vllm_env` for the same cores and processes), computing in
    ``dtype`` (the kvtier servers' choice: a comparison runs both in one dtype)."""
    from kvtier.integrations.model import prepare_default_model

    model = prepare_default_model(dtype=dtype.dtype if dtype else "bfloat16")
    command = [
        sys.executable,
        "-m",
        "kvtier.integrations.vllm_main",
        "--model",
        str(model),
        "--served-model-name",
        DEFAULT_MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if not has_gpu():
        command.append("--enforce-eager")
    if dtype is not None:
        command += dtype.vllm_options()
    return command + plain_layout(options).options() + list(options)


class Server:
    """A server process: started and healthy on ``with`` (``warm_up``: and one short request
    done), stopped (SIGTERM, then SIGKILL) on exit. Its output goes to ``log``; a server that
    dies or does not come up raises KvtierError with the end of that log."""

    def __init__(
        self,
        command: list[str],
        port: int,
        log: Path,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 300,
        warm_up: bool = False,
    ):
        self.command, self.port, self.log = command, port, log
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # plain vLLM refuses to start without
        self.start_timeout_s = start_timeout_s
        self.warm_up = warm_up
        self._proc: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.start()
        self.wait_ready()
        return self

    def start(self) -> None:
        """Start the process (see :meth:`wait_ready`)."""
        with open(self.log, "ab") as out:
            # A session of its own: stopping it reaches vLLM's engine processes too.
            self._proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self._deadline = time.monotonic() + self.start_timeout_s

    def ready(self) -> bool:
        """Whether it answers /health now; raises KvtierError if it died or is late."""
        assert self._proc is not None, "start() first"
        try:
            urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
            return True
        except (OSError, http.client.HTTPException):  # also a self-connect: port not bound yet
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise KvtierError(f"server exited ({code}): {self.tail()}") from None
            if time.monotonic() > self._deadline:
                self.stop()
                raise KvtierError(
                    f"server not up in {self.start_timeout_s:.0f}s: {self.tail()}"
                ) from None
            return False

    def wait_ready(self) -> None:
        """Wait until it is healthy (``warm_up``: and one short request is done)."""
        while not self.ready():
            time.sleep(0.5)
        if self.warm_up:  # a fresh engine's first forward pass carries one-time costs
            self.complete(list(range(1000, 1064)), max_tokens=1)

    def exit_code(self) -> int | None:
        """The process's exit code once it has exited (None while it runs or before start)."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM to the server, as a service manager sends it (vLLM shuts its engine down,
        kvtier flushes its writes); SIGKILL to all its processes after ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Engine processes that outlive the server would hold their memory and CPU.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def cores(self) -> list[int] | None:
        """The cores the engine computes on, as its log says (vLLM's worker process, or
        kvtier.integrations.vllm_main for a worker inside the engine core; None: not said)."""
        found = re.findall(r"(?:core ids=|computes on cores )\[([\d, ]*)\]", self.tail(1 << 20))
        return [int(c) for c in found[-1].split(",") if c.strip()] if found else None

    def model_process(self) -> str:
        """Where the model ran: "engine core" (the worker inside it, said by
        kvtier.integrations.vllm_main) or "worker process" (vLLM's own layout)."""
        return (
            "engine core"
            if "engine core computes on cores" in self.tail(1 << 20)
            else ("worker process")
        )

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def complete(
        self,
        prompt: str | list[int],
        max_tokens: int = 1,
        timeout_s: float = 600,
        api_key: str | None = None,
        **extra: Any,
    ) -> Completion:
        """A greedy completion of ``prompt`` (text, or token ids sent as they are), with
        ``api_key`` as ``Authorization: Bearer`` if given."""
        request = self._request(prompt, max_tokens, **extra)
        if api_key:
            request.add_header("Authorization", f"Bearer {api_key}")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise KvtierError(f"HTTP {exc.code} from the server: {exc.read()[:500]!r}") from None
        seconds = time.perf_counter() - start
        usage = reply.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        choice = reply["choices"][0]
        return Completion(
            choice["text"],
            seconds,
            int(usage.get("prompt_tokens", 0)),
            None if cached is None else int(cached),
            tuple((choice.get("logprobs") or {}).get("tokens") or ()),
        )

    def stream(
        self,
        prompt: str | list[int],
        max_tokens: int,
        arrivals: list[float] | None = None,
        stop: threading.Event | None = None,
        timeout_s: float = 600,
    ) -> list[float]:
        """Stream a greedy completion of up to ``max_tokens`` tokens (EOS ignored); the
        ``time.perf_counter()`` at which each token arrived, appended to ``arrivals`` as they
        come. Setting ``stop`` closes the connection after the next token (vLLM then aborts
        the request)."""
        request = self._request(prompt, max_tokens, stream=True, ignore_eos=True)
        arrivals = [] if arrivals is None else arrivals
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                for line in response:
                    if line.startswith(b"data: {"):
                        arrivals.append(time.perf_counter())
                    if stop is not None and stop.is_set():
                        break
        except urllib.error.HTTPError as exc:
            raise KvtierError(f"HTTP {exc.code} from the server: {exc.read()[:500]!r}") from None
        return arrivals

    def _request(
        self, prompt: str | list[int], max_tokens: int, **extra: Any
    ) -> urllib.request.Request:
        body = {
            "model": DEFAULT_MODEL_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            **extra,
        }
        return urllib.request.Request(
            f"{self.url}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
