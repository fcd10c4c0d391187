"""A private ``redis-server`` (or a small Redis Cluster) on free loopback ports.

Used by the tests and by ``kvtier bench store --tier redis`` when no ``--redis URL`` is
given. Nothing is persisted: no RDB snapshots, no AOF, a temporary working directory.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from kvtier.errors import KvtierError

_MISSING = (
    "redis-server is not on PATH: run `make install` (it installs redis-server with apt-get),"
    " or pass the URL of a running server"
)


def free_port() -> int:
    """A free loopback port below 55536 (a cluster node also uses port + 10000), outside the
    kernel's ephemeral range where it can: a server started on it (vLLM takes half a minute to
    bind) would otherwise find it taken by some process's outgoing connection."""
    candidates = _outside_ephemeral()
    for _ in range(200):
        port = random.choice(candidates) if candidates else random.randint(20000, 55000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if _port_free(port + 10000):
            return port
    raise KvtierError("no free loopback port found")


def _outside_ephemeral() -> range:
    """Ports p with p and p + 10000 both outside the ephemeral range (empty if none)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    below = range(10000, max(10000, low - 10000))
    return below if len(below) >= 1000 else range(max(high + 1, 10000), 55536)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# What kvtier's tiers and router send (RedisTier, BulkReader, SharedTier): nothing else, not
# even SCAN, which key patterns would not restrict. (redis-py's CLIENT SETINFO greeting, on
# servers that know it, is refused and ignored.)
KVTIER_COMMANDS = ("get", "set", "exists", "del", "getrange", "strlen", "ping", "select")


class RedisServer:
    """One redis-server process bound to 127.0.0.1. Restartable on the same port.

    ``acl_user``: the default user is off, and this user alone, with a password made at
    start, may run :data:`KVTIER_COMMANDS` on the keys under ``acl_prefix``. The password is
    in :attr:`password_file` (readable by this user alone), passed to redis-server in a
    configuration file of the same kind: never on a command line.

    ``tls``: (certificate, key, CA certificate) files: it then speaks TLS only, and
    :attr:`url` is ``rediss://`` with the CA for clients to check it against.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        acl_user: str = "",
        acl_prefix: str = "kvtier",
        tls: tuple[str, str, str] | None = None,
    ):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise KvtierError(_MISSING)
        self.port = port or free_port()
        self.extra_args = extra_args
        self._dir = tempfile.mkdtemp(prefix="kvtier-redis-")  # 0700
        self._proc: subprocess.Popen[bytes] | None = None
        self.username = acl_user
        self.password_file = ""
        self.tls = tls
        self._conf: list[str] = []
        if acl_user:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", acl_user + acl_prefix):
                raise KvtierError("acl_user and acl_prefix: letters, digits, '_' and '-'")
            password = secrets.token_urlsafe(32)
            self.password_file = self._private("password", password + "\n")
            rules = " ".join(f"+{c}" for c in KVTIER_COMMANDS)
            acl = f"user {acl_user} on >{password} ~{acl_prefix}:* resetchannels -@all {rules}"
            self._conf = [self._private("redis.conf", f"user default off\n{acl}\n")]

    def _private(self, name: str, text: str) -> str:
        path = Path(self._dir) / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return str(path)

    def client(self, **options: Any) -> redis.Redis:
        """A client of this server, as its ACL user if it has one."""
        if self.password_file:
            options["username"] = self.username
            options["password"] = Path(self.password_file).read_text().strip()
        return redis.Redis.from_url(self.url, **options)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        assert self.binary is not None
        ports = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert]
            ports += ["--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        args = [
            self.binary,
            *self._conf,  # a configuration file first, if any
            *ports,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--logfile",
            str(Path(self._dir) / "redis.log"),
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = self.client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    raise KvtierError(f"redis-server exited at start: {err or self.log_tail()}")
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError as exc:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise KvtierError(
                            f"redis-server did not answer on port {self.port}"
                        ) from exc
                    time.sleep(0.02)
        finally:
            client.close()

    def log_tail(self) -> str:
        log = Path(self._dir) / "redis.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start() if not self.running else self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RedisClusterProcess:
    """``nodes`` cluster-enabled redis-servers (no replicas), joined with redis-cli."""

    def __init__(self, nodes: int = 3):
        if shutil.which("redis-cli") is None:
            raise KvtierError(_MISSING)
        self.servers = [
            RedisServer(extra_args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"))
            for _ in range(nodes)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self, timeout_s: float = 20.0) -> RedisClusterProcess:
        for server in self.servers:
            server.start()
        addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addrs,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        for server in self.servers:
            client = redis.Redis(port=server.port)
            try:
                while self._cluster_state(client) != "ok":
                    if time.monotonic() > deadline:
                        raise KvtierError("the Redis cluster did not reach cluster_state:ok")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    @staticmethod
    def _cluster_state(client: redis.Redis) -> str:
        info = client.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
        return str(info.get("cluster_state"))

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisClusterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
