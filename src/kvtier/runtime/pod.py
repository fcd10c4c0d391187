"""``kvtier pod``: several ``kvtier serve`` engines, one shared tier and the router, on one
machine, started and stopped together.

Each engine has its own DRAM and disk tiers (``<state>/engine-<i>/chunks``, kept across runs),
shares the context tier (a private ``redis-server`` on a free loopback port unless a URL is
given) and, with ``--s3``, an object tier (a bucket, or a private SeaweedFS with ``local``,
keeping its data in ``<state>/s3``) and, on CPU, computes on its own cores (vLLM's
``VLLM_CPU_OMP_THREADS_BIND``), so that engines do not fight over them. Stopping the pod
(Ctrl-C, SIGTERM) stops everything it started. A disaggregated pod has prefill engines too
(``prefill-<i>``: DRAM only, writing through to the shared tier) and calls the others
``decode-<i>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.errors import KvtierError
from kvtier.integrations.engine_layout import has_gpu
from kvtier.redis_process import RedisServer, free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command
from kvtier.seaweed_process import SeaweedFS


@dataclass(frozen=True)
class EngineSpec:
    port: int
    cores: tuple[int, ...]
    disk: Path | None  # None: no disk tier (a prefill engine)
    log: Path
    options: tuple[str, ...] = ()
    prefill: bool = False  # a disaggregated pod's prefill engine (writes through)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def split_cores(cores: Sequence[int], engines: int) -> list[tuple[int, ...]]:
    """Cores for each engine: an even split of ``cores``; engines share when there are fewer
    cores than engines (round robin, one core each)."""
    if engines <= 0:
        raise ValueError(f"a pod needs at least one engine, got {engines}")
    ordered = sorted(cores)
    if len(ordered) < engines:
        return [(ordered[i % len(ordered)],) for i in range(engines)]
    per = len(ordered) // engines
    return [tuple(ordered[i * per : (i + 1) * per]) for i in range(engines)]


def core_list(cores: Sequence[int]) -> str:
    return ",".join(str(c) for c in cores)


@dataclass
class Pod:
    """The processes of a pod; :meth:`start` them, :meth:`stop` them (idempotent)."""

    engines: list[EngineSpec]
    redis_url: str | None  # None: start a private redis-server; "none": no shared tier
    start_timeout_s: float = 600
    s3: str | None = None  # an object tier's URL; "local": a private SeaweedFS; None: none
    s3_dir: Path | None = None  # where a private SeaweedFS keeps its data
    servers: list[Server] = field(default_factory=list)
    redis: RedisServer | None = None
    seaweed: SeaweedFS | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: bool = False

    @property
    def shared_url(self) -> str:
        """The shared tier's URL ("none" when the engines share no tier)."""
        if self.redis_url:
            return self.redis_url
        assert self.redis is not None, "start() first"
        return self.redis.url

    @property
    def s3_url(self) -> str | None:
        """The object tier's URL (None: the engines have none)."""
        if self.seaweed is not None:
            return self.seaweed.url
        return self.s3 if self.s3 not in (None, "none", "local") else None

    @property
    def urls(self) -> list[str]:
        """The engines that answer requests (colocated or decode)."""
        return [e.url for e in self.engines if not e.prefill]

    @property
    def prefill_urls(self) -> list[str]:
        return [e.url for e in self.engines if e.prefill]

    def start(self, progress: bool = True) -> None:
        try:
            if self.redis_url is None:
                # Its own ACL user, password in a file: no engine or router has more rights
                # than kvtier needs, and the password shows in no command line or log.
                self.redis = RedisServer(acl_user="kvtier").start()
            if self.s3 == "local":  # its keys reach the engines in a file named by env
                directory = str(self.s3_dir) if self.s3_dir else None
                self.seaweed = SeaweedFS(directory=directory).start()
            for spec in self.engines:
                if spec.disk is not None:
                    spec.disk.mkdir(parents=True, exist_ok=True)
                disk = ("--disk", str(spec.disk) if spec.disk else "none")
                # A prefill engine's answer returns once the shared tier holds the prompt.
                role = ("--write-through",) if spec.prefill else ()
                shared: tuple[str, ...] = ()
                if self.shared_url != "none":
                    shared = ("--redis", self.shared_url)
                if self.redis is not None and self.redis.password_file:
                    shared += ("--redis-user", self.redis.username)
                    shared += ("--redis-password-file", self.redis.password_file)
                if self.s3_url:
                    shared += ("--s3", self.s3_url)
                options = (*disk, *role, *shared, *spec.options)
                env = self.seaweed.env() if self.seaweed is not None else {}
                if not has_gpu():
                    env["VLLM_CPU_OMP_THREADS_BIND"] = core_list(spec.cores)
                server = Server(
                    kvtier_serve_command(spec.port, *options),
                    spec.port,
                    spec.log,
                    env,
                    self.start_timeout_s,
                )
                server.start()
                self.servers.append(server)
            self._wait(progress)
        except BaseException:
            self.stop()
            raise

    def _wait(self, progress: bool) -> None:
        started = time.monotonic()
        pending = set(range(len(self.servers)))
        shown = -1
        while pending:
            for i in sorted(pending):
                if self.servers[i].ready():
                    pending.discard(i)
            up = len(self.servers) - len(pending)
            if progress and (sys.stderr.isatty() or up != shown):
                shown = up
                line = f"kvtier pod: {up}/{len(self.servers)} engines up"
                line += f" ({time.monotonic() - started:.0f} s)"
                if sys.stderr.isatty():  # one line, rewritten
                    print("\r" + line, end="" if pending else "\n", file=sys.stderr, flush=True)
                else:
                    print(line, file=sys.stderr, flush=True)
            if pending:
                time.sleep(0.5)

    def supervise(self, stopping: threading.Event, every_s: float = 1.0) -> threading.Thread:
        """Restart engines that exit (crash, OOM kill) until ``stopping`` is set; the router
        takes them out of rotation meanwhile and resyncs from their feed when they are back."""

        def loop() -> None:
            while not stopping.wait(every_s):
                for i, server in enumerate(list(self.servers)):
                    with self._lock:  # never restart one that stop() is stopping
                        code = server.exit_code()
                        if code is None or self._stopped:
                            continue
                        print(
                            f"kvtier pod: engine {i} exited ({code}); restarting it, log"
                            f" {server.log}",
                            file=sys.stderr,
                            flush=True,
                        )
                        server.stop(timeout_s=5)  # whatever is left of its process group
                        server.start()

        thread = threading.Thread(target=loop, name="kvtier-pod-supervisor", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """SIGTERM to every engine (they flush their writes), SIGKILL to what is left."""
        with self._lock:
            self._stopped = True
            servers, self.servers = self.servers, []
        for server in servers:
            pid = server.pid
            if pid is not None:  # all at once: they drain in parallel
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for server in servers:
            server.stop(timeout_s=45)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.seaweed is not None:  # after the engines: they flush their uploads first
            self.seaweed.close()
            self.seaweed = None


def plan_pod(
    engines: int,
    first_port: int | None,
    state_dir: Path,
    log_dir: Path,
    cores: Sequence[int],
    options: Sequence[str] = (),
    prefill: int = 0,
) -> list[EngineSpec]:
    """Ports, cores, disk directories and log files of ``prefill`` prefill engines (first;
    no disk tier: they write through to the shared tier) and ``engines`` engines that answer
    requests (colocated, or the decode engines when ``prefill`` > 0)."""
    if engines < 1:
        raise KvtierError(f"a pod needs at least 1 engine that answers requests, got {engines}")
    if prefill < 0:
        raise KvtierError(f"--prefill must not be negative, got {prefill}")
    specs = []
    for i, mine in enumerate(split_cores(cores, prefill + engines)):
        port = first_port + i if first_port else free_port()
        if i < prefill:
            name, disk = f"prefill-{i}", None
        else:
            name = f"decode-{i - prefill}" if prefill else f"engine-{i}"
            disk = state_dir / name / "chunks"
        spec = EngineSpec(port, mine, disk, log_dir / f"{name}.log", tuple(options), i < prefill)
        specs.append(spec)
    return specs


def run_pod(args: argparse.Namespace, engines: int, prefill: int, extra: list[str]) -> None:
    """``kvtier pod`` with its parsed options: the engines, the shared tier and the router,
    until SIGINT/SIGTERM; then everything it started is stopped."""
    from kvtier.router.serve import make_router, serve_router

    state = args.state.expanduser()
    logs = state / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    options = ["--dram", args.dram, *extra, *pod_dtype_options(extra)]
    if args.tenants:  # every engine authenticates too: one may be reached on its own port
        options += ["--tenants", str(Path(args.tenants).resolve())]
    if getattr(args, "master_key_file", None):  # every engine seals with the same keys
        options += ["--master-key-file", str(Path(args.master_key_file).resolve())]
    for spec in getattr(args, "codec", None) or []:  # every engine stores the same forms
        options += ["--codec", spec]
    cores = sorted(os.sched_getaffinity(0))
    specs = plan_pod(engines, args.engine_port, state, logs, cores, options, prefill)
    s3 = getattr(args, "s3", None)
    pod = Pod(specs, args.redis, s3=s3, s3_dir=state / "s3" if s3 == "local" else None)
    for spec in specs:
        print(
            f"kvtier pod: {spec.log.stem} on port {spec.port}, cores {list(spec.cores)},"
            f" log {spec.log}",
            file=sys.stderr,
        )
    stopping = threading.Event()
    try:
        pod.start()
        print(f"kvtier pod: shared tier {pod.shared_url}", file=sys.stderr)
        if pod.s3_url:
            where = "a private SeaweedFS on loopback" if pod.seaweed else "given"
            print(f"kvtier pod: object tier {pod.s3_url} ({where})", file=sys.stderr)
        pod.supervise(stopping)
        router = make_router(pod.urls, args.policy, args.tokenizer, pod.prefill_urls, args.tenants)
        serve_router(router, args.host, args.port)
    finally:
        stopping.set()
        print("kvtier pod: stopping engines", file=sys.stderr, flush=True)
        pod.stop()


def pod_dtype_options(extra: list[str]) -> list[str]:
    """The engines' dtype, chosen once for all of them (see :func:`engine_dtype`): the user's
    ``--dtype`` (already among ``extra``), else measured here and handed to each engine."""
    from kvtier.integrations.engine_dtype import HANDED_DTYPE
    from kvtier.integrations.engine_layout import option
    from kvtier.runtime.engine_command import engine_dtype

    choice = engine_dtype(argparse.Namespace(), extra)
    print(f"kvtier pod: {choice.line()}", file=sys.stderr)
    if option(extra, "--dtype") is not None or option(extra, HANDED_DTYPE) is not None:
        return []  # already among the options every engine gets (a benchmark's choice)
    return choice.serve_options()
