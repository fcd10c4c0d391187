"""Tenants: who a request comes from, decided by the server from its API key, and the cache
salt that keeps each tenant's chunks apart.

A tenants file (YAML) lists the tenants, each with the hashes of its API keys (never the keys)
and optional quotas::

    secret_file: tenants.secret  # the key of every salt (`kvtier tenants init` makes both)
    anonymous: isolated          # requests without a key: a tenant of their own (or: refuse)
    tenants:
      - name: acme
        keys: [sha256:9f86d081884c7d65...]   # `kvtier tenants key` makes a key and its hash
        quota: {memory: 512MiB, disk: 5GiB}  # optional, per tier

A request's tenant comes from its ``Authorization: Bearer KEY`` header only. The salt of its
chunks (vLLM's ``cache_salt``, which also divides vLLM's own prefix cache) is derived from the
tenant and the client's own ``cache_salt``, length-prefixed and hashed with the secret of
``secret_file`` (HMAC-SHA256): a client salt can divide its tenant's cache but never name
another tenant's, no pair of tenant and client salt gives another pair's salt, and without the
secret nobody can compute a tenant's chunk keys (so the keys the engines' feeds list reveal
nothing). The derived salt shows no tenant name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtier.config import parse_size, read_secret
from kvtier.errors import ConfigError
from kvtier.keys import SALT_PREFIX as SALT_PREFIX
from kvtier.keys import salt_tenant as salt_tenant

ANONYMOUS = "anonymous"  # the tenant of requests without a key (a reserved name)
KEY_HASH = "sha256:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_SALT_DOMAIN = b"kvtier tenant salt v1"
_ID_DOMAIN = b"kvtier tenant id v1"


RESERVED = (ANONYMOUS, "other", "unknown")  # labels /metrics gives to other requests or chunks


def valid_name(name: object) -> bool:
    """Whether ``name`` can name a tenant (the names of :data:`RESERVED` are taken)."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and name not in RESERVED


class Unauthorized(Exception):
    """A request the tenants file does not admit: HTTP 401 with this message."""


def hash_key(key: str) -> str:
    """How a tenants file stores an API key: ``sha256:`` and the hex digest. API keys are long
    random strings (:func:`new_key`), so a fast hash is enough to keep them out of the file."""
    return KEY_HASH + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return "kvt-" + secrets.token_urlsafe(32)


def _lp(*parts: bytes) -> bytes:
    """Each part length-prefixed: no two lists of parts encode alike."""
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


def _digest(secret: bytes, encoded: bytes) -> str:
    digest = hmac.new(secret, encoded, hashlib.sha256) if secret else hashlib.sha256(encoded)
    return digest.hexdigest()


def tenant_id(tenant: str, secret: bytes = b"") -> str:
    """16 hex digits that name ``tenant`` inside the server (its salts begin with them, so
    the engine counts a request's tokens for its tenant without knowing its name)."""
    return _digest(secret, _lp(_ID_DOMAIN, tenant.encode("utf-8")))[:16]


def derive_salt(tenant: str, client_salt: str | None, secret: bytes = b"") -> str:
    """The cache salt of ``tenant``'s requests with the client's ``cache_salt`` (None or "":
    none): ``kvt1-``, the tenant's id, ``-`` and the digest of the length-prefixed tenant and
    client salt, so no two (tenant, client salt) pairs give one salt; keyed with ``secret``
    (the tenants file's), nobody without it can compute a tenant's chunk keys."""
    encoded = _lp(_SALT_DOMAIN, tenant.encode("utf-8"), (client_salt or "").encode("utf-8"))
    return f"{SALT_PREFIX}{tenant_id(tenant, secret)}-{_digest(secret, encoded)}"


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: tuple[str, ...] = ()
    quota: dict[str, int] = field(default_factory=dict)  # tier name -> bytes


@dataclass(frozen=True)
class Tenants:
    """The tenants of a server, from its tenants file."""

    tenants: tuple[Tenant, ...]
    refuse_anonymous: bool = False
    source: str = "(built in code)"
    secret: bytes = b""  # the salts' key (b"": salts a public function of the tenant's name)
    _by_hash: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        names: set[str] = set()
        for tenant in self.tenants:
            if tenant.name in names:
                raise ConfigError(f"{self.source}: tenant {tenant.name!r} is listed twice")
            names.add(tenant.name)
            for h in tenant.key_hashes:
                if h in self._by_hash:
                    other = self._by_hash[h]
                    raise ConfigError(
                        f"{self.source}: tenants {other!r} and {tenant.name!r} share a key"
                    )
                self._by_hash[h] = tenant.name

    @property
    def unkeyed_warning(self) -> str | None:
        """What a server says at start when the salts have no secret (None: they do)."""
        if self.secret:
            return None
        return (
            f"{self.source} has no secret_file: a tenant's cache salt is a public function of"
            " its name, so whoever reads the chunk keys an engine lists (/kvtier/) can test a"
            " guessed prompt of a named tenant; `kvtier tenants init` makes a file with one"
        )

    @property
    def names(self) -> list[str]:
        """Every tenant a request can be, anonymous included unless refused."""
        named = [t.name for t in self.tenants]
        return named if self.refuse_anonymous else [*named, ANONYMOUS]

    def by_id(self) -> dict[str, str]:
        """Each tenant's name by its id (:func:`tenant_id`), anonymous included."""
        return {tenant_id(name, self.secret): name for name in [*self.names, ANONYMOUS]}

    def salt(self, tenant: str, client_salt: object) -> str:
        """The cache salt of ``tenant``'s request with ``client_salt`` (its ``cache_salt``;
        anything but a string counts as none)."""
        given = client_salt if isinstance(client_salt, str) else None
        return derive_salt(tenant, given, self.secret)

    def identify(self, authorization: str | None) -> str:
        """The tenant named by an ``Authorization`` header's value (None: no header); raises
        :class:`Unauthorized` for a key the file does not list, or no key where the file
        refuses anonymous requests. The message never repeats the key."""
        if authorization is None:
            if self.refuse_anonymous:
                raise Unauthorized("this server needs an API key: send Authorization: Bearer KEY")
            return ANONYMOUS
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("expected an Authorization header of the form: Bearer KEY")
        name = self._by_hash.get(hash_key(key.strip()))
        if name is None:
            raise Unauthorized("unknown API key")
        return name


def load_tenants(path: str | Path) -> Tenants:
    """Read and check a tenants file; errors name the file and the field."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the tenants file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'tenants' list")
    unknown = set(raw) - {"tenants", "anonymous", "secret_file"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown keys {sorted(unknown)} (known: secret_file, anonymous, tenants)"
        )
    secret = b""
    if raw.get("secret_file"):  # relative to the tenants file
        secret_path = Path(path).parent / str(raw["secret_file"])
        secret = bytes.fromhex(_secret(secret_path, source))
    anonymous = raw.get("anonymous", "isolated")
    if anonymous not in ("isolated", "refuse"):
        raise ConfigError(f"{source}: anonymous: 'isolated' or 'refuse', got {anonymous!r}")
    entries = raw.get("tenants") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: tenants: expected a list")
    tenants = tuple(_tenant(entry, f"{source}: tenants[{i}]") for i, entry in enumerate(entries))
    return Tenants(tenants, anonymous == "refuse", source, secret)


def _secret(path: Path, source: str) -> str:
    text = read_secret(str(path), f"{source}: secret_file")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ConfigError(
            f"{source}: secret_file {path}: expected 64 hex digits (kvtier tenants init)"
        )
    return text


def new_secret() -> str:
    """A fresh salt key: 256 random bits, as 64 hex digits."""
    return secrets.token_hex(32)


def _tenant(entry: Any, where: str) -> Tenant:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with name and keys")
    unknown = set(entry) - {"name", "keys", "quota"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: name, keys, quota)")
    name = entry.get("name")
    if not valid_name(name):
        raise ConfigError(
            f"{where}: name: 1-64 letters, digits, '_', '.', '-' (not {', '.join(RESERVED)}),"
            f" got {name!r}"
        )
    keys = entry.get("keys") or []
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{where} ({name}): keys: a list of at least one key hash")
    for key in keys:
        if not isinstance(key, str) or not _HASH.fullmatch(key):
            raise ConfigError(
                f"{where} ({name}): keys: each is sha256: and 64 hex digits (the hash of a key,"
                " never the key: `kvtier tenants key` prints both)"
            )
    quota = entry.get("quota") or {}
    if not isinstance(quota, dict):
        raise ConfigError(f"{where} ({name}): quota: a mapping of tier name to size")
    sizes = {str(t): parse_size(v, f"{where} ({name}): quota.{t}") for t, v in quota.items()}
    return Tenant(str(name), tuple(keys), sizes)
