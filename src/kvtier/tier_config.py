"""The tiers' configurations (``kind: memory | disk | redis | s3`` in a store's ``tiers:``)
and the sizes they are given in; loaded by :mod:`kvtier.config`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import ConfigError
from kvtier.policy.eviction import POLICY_NAMES

COMPRESSIONS = ("none", "zstd", "lz4", "bf16", "int8", "int8c", "fp8", "int4", "int4r", "k8v4")
EVICTIONS = POLICY_NAMES
_SIZE_UNITS = {"": 1, "b": 1}
_SIZE_UNITS |= {f"{p}b": 1000**i for i, p in enumerate("kmgt", 1)}  # kb ... tb
_SIZE_UNITS |= {f"{p}ib": 1024**i for i, p in enumerate("kmgt", 1)}  # kib ... tib
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
SIZE = {"size": True}


def parse_size(value: object, key: str = "size") -> int:
    """Bytes from ``2GiB``, ``512MiB``, ``1.5GB``, ``4096`` (B/KB/MB/GB/TB are powers of 1000)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 512MiB or 2GiB, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(
                f"{key}: a size without a unit is a whole number of bytes, got {value!r}"
            )
        n = int(value)
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{key}: expected a size like 512MiB, 2GiB or 1.5GB (units: B, KB, MB, GB, TB,"
                f" KiB, MiB, GiB, TiB), got {value!r}"
            )
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{key}: must be a positive size, got {value!r}")
    return n


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class MemoryTierConfig:
    kind: str = "memory"
    name: str = "memory"
    capacity: int = field(default=2 * 2**30, metadata=SIZE)
    compression: str = "none"
    eviction: str = "lru"
    # In an engine, touch the tier's memory at start (~0.7 s per GiB here) so that saving KV
    # does not pay page faults on the critical path while the tier fills.
    prefault: bool = True

    def __post_init__(self) -> None:
        _choice("compression", self.compression, COMPRESSIONS)
        _choice("eviction", self.eviction, EVICTIONS)
        if self.capacity <= 0:
            raise ConfigError(f"capacity: must be positive, got {self.capacity}")


@dataclass(frozen=True)
class DiskTierConfig:
    kind: str = "disk"
    name: str = "disk"
    path: str = "~/.cache/kvtier/chunks"
    capacity: int = field(default=20 * 2**30, metadata=SIZE)
    compression: str = "none"
    eviction: str = "lru"
    fsync: bool = True

    def __post_init__(self) -> None:
        _choice("compression", self.compression, COMPRESSIONS)
        _choice("eviction", self.eviction, EVICTIONS)
        if self.capacity <= 0:
            raise ConfigError(f"capacity: must be positive, got {self.capacity}")
        if not self.path:
            raise ConfigError("path: a disk tier needs a directory")


@dataclass(frozen=True)
class RedisTierConfig:
    kind: str = "redis"
    name: str = "redis"
    url: str = ""
    prefix: str = "kvtier"
    ttl_s: int | None = None
    cluster: bool = False
    timeout_s: float = 2.0
    compression: str = "none"
    username: str = ""  # an ACL user ("": the default user)
    password_file: str = ""  # a file holding the user's password ("": none)

    def __post_init__(self) -> None:
        _choice("compression", self.compression, COMPRESSIONS)
        if not re.match(r"^(redis|rediss|unix)://", self.url):
            raise ConfigError(
                f"url: expected redis://host:port[/db] (or rediss://, unix://), got {self.url!r}"
            )
        if "@" in self.url.split("://", 1)[1].split("/", 1)[0]:
            raise ConfigError(
                "url: no user or password in the URL (a URL shows in command lines, logs and"
                " /kvtier/info): give username, and password_file naming a file that holds"
                " the password (kvtier serve --redis-user, --redis-password-file)"
            )
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError(f"ttl_s: must be a positive number of seconds, got {self.ttl_s}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class S3TierConfig:
    """An object store (S3 API: AWS S3, MinIO, Ceph RGW, SeaweedFS), one object per chunk
    under ``<prefix>/v1/``. Credentials from the AWS environment variables or ``profile``."""

    kind: str = "s3"
    name: str = "s3"
    bucket: str = ""
    endpoint: str = ""  # http(s)://host:port of an S3-compatible store; "": AWS S3
    prefix: str = "kvtier"
    region: str = ""  # "": AWS_REGION, AWS_DEFAULT_REGION, else us-east-1
    profile: str = ""  # a profile of the shared credentials file ("": the environment first)
    capacity: int = field(default=100 * 2**30, metadata=SIZE)
    compression: str = "none"
    eviction: str = "lru"
    concurrency: int = 8  # requests in flight per batch
    timeout_s: float = 2.0  # per connect / socket read: a stalled store costs hits, not time
    create_bucket: bool = False  # create the bucket if missing (a private store's first start)

    def __post_init__(self) -> None:
        _choice("compression", self.compression, COMPRESSIONS)
        _choice("eviction", self.eviction, EVICTIONS)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise ConfigError(
                f"bucket: an S3 bucket name (3-63 lowercase letters, digits, '.', '-'), got"
                f" {self.bucket!r}"
            )
        if "@" in self.endpoint:  # never echoed: what is before the @ may be a secret
            raise ConfigError("endpoint: no credentials in a URL (AWS_* variables or a profile)")
        if self.endpoint and not re.fullmatch(r"https?://[^/@\s]+/?", self.endpoint):
            raise ConfigError(
                f"endpoint: expected http(s)://host[:port] (no path, no credentials), got"
                f" {self.endpoint!r}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", self.prefix):
            raise ConfigError(f"prefix: letters, digits, '_', '-' and '/', got {self.prefix!r}")
        if self.capacity <= 0:
            raise ConfigError(f"capacity: must be positive, got {self.capacity}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency: at least 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be positive, got {self.timeout_s}")


def s3_location(url: str) -> dict[str, str]:
    """An S3 tier's ``endpoint``, ``bucket`` and ``prefix`` from ``s3://BUCKET[/PREFIX]`` (AWS)
    or ``http(s)://HOST[:PORT]/BUCKET[/PREFIX]`` (an S3-compatible store, path-style)."""
    if "@" in url:  # never echoed: what is before the @ may be a secret
        raise ConfigError(
            "a URL with credentials (user:password@) is refused: no credentials in a URL;"
            " give them in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile (AWS_PROFILE)"
        )
    m = re.fullmatch(r"(?:s3://|(https?://[^/\s]+)/)([^/\s]+)(?:/([^\s]*))?", url.strip())
    if not m:
        raise ConfigError(
            f"expected s3://BUCKET[/PREFIX] or http(s)://HOST:PORT/BUCKET[/PREFIX], got {url!r}"
        )
    endpoint, bucket, prefix = m.groups()
    found = {"bucket": bucket, "endpoint": endpoint or ""}
    if prefix and prefix.strip("/"):
        found["prefix"] = prefix.strip("/")
    return found


TierConfig = MemoryTierConfig | DiskTierConfig | RedisTierConfig | S3TierConfig
TIER_KINDS: dict[str, type[Any]] = {
    "memory": MemoryTierConfig,
    "disk": DiskTierConfig,
    "redis": RedisTierConfig,
    "s3": S3TierConfig,
}
