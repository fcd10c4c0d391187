"""Configuration: frozen dataclasses, loaded at one edge from YAML and ``KVTIER_*`` variables.

YAML::

    chunk_tokens: 256
    write_queue: 64
    master_key_file: /etc/kvtier/master.key   # encryption at rest below DRAM (optional)
    tenants_file: /etc/kvtier/tenants.yaml    # quotas per tenant and tier (kvtier serve --tenants)
    tiers:
      - {kind: memory, capacity: 2GiB}
      - {kind: disk, path: ~/.cache/kvtier/chunks, capacity: 20GiB}
      - {kind: redis, url: "redis://127.0.0.1:6379/0", ttl_s: 86400}
      - {kind: s3, endpoint: "http://127.0.0.1:8333", bucket: kvtier, capacity: 1TiB}

Environment (applied over the file): ``KVTIER_CONFIG`` names the file; ``KVTIER_CHUNK_TOKENS``,
``KVTIER_WRITE_QUEUE``, ``KVTIER_RETRY_AFTER_S`` set store fields; ``KVTIER_<TIER>_<FIELD>``
sets a field of the tier named TIER (``KVTIER_DISK_CAPACITY=50GiB``), adding a tier of that
kind when none has that name (``KVTIER_REDIS_URL=redis://...`` adds a Redis tier).
``KVTIER_MASTER_KEY`` (master keys, hex, comma-separated) turns encryption at rest on.

Unknown keys and bad values raise ConfigError naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtier.errors import ConfigError
from kvtier.tier_config import (
    COMPRESSIONS,
    SIZE,
    TIER_KINDS,
    DiskTierConfig,
    MemoryTierConfig,
    RedisTierConfig,
    S3TierConfig,
    TierConfig,
    format_size,
    parse_size,
)

__all__ = [
    "COMPRESSIONS",
    "SIZE",
    "DiskTierConfig",
    "MemoryTierConfig",
    "RedisTierConfig",
    "S3TierConfig",
    "TierConfig",
    "format_size",
    "parse_size",
]
MASTER_KEY_VAR = "KVTIER_MASTER_KEY"  # master keys in the environment (kvtier.sealing)
GATE_VAR = "KVTIER_FIDELITY_DIR"  # where the quality gate's records are (kvtier.gate)


# The vLLM connector's `loads` option (kv_connector_extra_config, `kvtier serve --loads`):
# when hits are loaded. It is not part of the store's configuration.
LOAD_MODES = ("auto", "async", "sync")


def _default_tiers() -> tuple[TierConfig, ...]:
    return (MemoryTierConfig(), DiskTierConfig())


@dataclass(frozen=True)
class StoreConfig:
    chunk_tokens: int = 256
    write_queue: int = 64
    retry_after_s: float = 1.0
    tiers: tuple[TierConfig, ...] = field(default_factory=_default_tiers)
    # Encryption at rest (kvtier.sealing): a file of master keys, or the variable holding them
    # (its name, never a key); neither: in clear. encrypt_dram seals the DRAM tier's too.
    master_key_file: str = ""
    master_key_env: str = ""
    encrypt_dram: bool = False
    tenants_file: str = ""  # kvtier.tenants: each tenant's quota per tier, or an equal share

    def __post_init__(self) -> None:
        if self.master_key_file and self.master_key_env:
            raise ConfigError("master_key_file and master_key_env: give one of them")
        if self.encrypt_dram and not (self.master_key_file or self.master_key_env):
            raise ConfigError("encrypt_dram: needs master_key_file or master_key_env")
        if not 16 <= self.chunk_tokens <= 65536:
            raise ConfigError(f"chunk_tokens: must be in [16, 65536], got {self.chunk_tokens}")
        if self.write_queue <= 0:
            raise ConfigError(f"write_queue: must be positive, got {self.write_queue}")
        if self.retry_after_s <= 0:
            raise ConfigError(f"retry_after_s: must be positive, got {self.retry_after_s}")
        if not self.tiers:
            raise ConfigError("tiers: at least one tier is needed")
        names = [t.name.lower() for t in self.tiers]
        for tier in self.tiers:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", tier.name):
                raise ConfigError(
                    f"tiers: tier name {tier.name!r} must start with a letter and hold only"
                    " letters, digits and _ (it is also the KVTIER_<NAME>_* prefix)"
                )
            if names.count(tier.name.lower()) > 1:
                raise ConfigError(
                    f"tiers: two tiers are named {tier.name!r} (names ignore case);"
                    " give them distinct names"
                )


def _coerce(key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """Turn a YAML or environment value into the field's type, or raise naming ``key``."""
    if meta.get("size"):
        return parse_size(value, key)
    optional = type(None) in typing.get_args(hint)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("", "none"))):
        return None
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        if base is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except ValueError:
        pass
    raise ConfigError(f"{key}: expected {getattr(base, '__name__', base)}, got {value!r}")


def _build(cls: type[Any], values: Mapping[str, Any], where: str, env: bool = False) -> Any:
    """``cls(**values)`` with coercion; errors say ``where`` + the key (upper-cased for env)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "tiers"}

    def name(key: str) -> str:
        return where + (key.upper() if env else key)

    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}{key!r}: keys must be names (strings), got {key!r}")
        if key not in fields:
            allowed = ", ".join(name(f) if env else f for f in sorted(fields))
            raise ConfigError(f"{name(key)}: unknown key; allowed: {allowed}")
        kwargs[key] = _coerce(name(key), value, hints[key], fields[key].metadata)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        key, _, problem = str(exc).partition(": ")
        raise ConfigError(f"{name(key)}: {problem}") from None


def _tier_from(values: Any, where: str, env: bool = False) -> TierConfig:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where[:-1]}: expected a mapping with a 'kind', got {values!r}")
    kind = values.get("kind")
    if not isinstance(kind, str) or kind not in TIER_KINDS:
        raise ConfigError(f"{where}kind: {kind!r} is not allowed; allowed: {', '.join(TIER_KINDS)}")
    values = {"name": kind, **values}
    if "codec" in values:  # the name the docs use; `compression` is the field's
        if "compression" in values:
            raise ConfigError(f"{where}codec: give codec or compression, not both")
        values["compression"] = values.pop("codec")
    tier: TierConfig = _build(TIER_KINDS[kind], values, where, env)
    return tier


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> StoreConfig:
    """A StoreConfig from a parsed YAML mapping; errors name ``source`` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    top = {k: v for k, v in data.items() if k != "tiers"}
    tiers: tuple[TierConfig, ...] = _default_tiers()
    if "tiers" in data:
        raw = data["tiers"]
        if not isinstance(raw, list):
            raise ConfigError(f"{source}: tiers: expected a list of tiers, got {raw!r}")
        tiers = tuple(_tier_from(t, f"{source}: tiers[{i}].") for i, t in enumerate(raw))
    base: StoreConfig = _build(StoreConfig, top, f"{source}: ")
    try:
        return dataclasses.replace(base, tiers=tiers)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _apply_env(config: StoreConfig, env: Mapping[str, str]) -> StoreConfig:
    store_fields = {f.name.upper() for f in dataclasses.fields(StoreConfig)} - {"TIERS"}
    top: dict[str, Any] = {}
    # Master keys in the environment turn encryption on (kvtier.sealing reads them there).
    named = config.master_key_file or env.get("KVTIER_MASTER_KEY_FILE")
    if env.get(MASTER_KEY_VAR) and not named:
        top["master_key_env"] = MASTER_KEY_VAR
    tiers = list(config.tiers)
    # Longest names first, so a tier named "disk_fast" wins over the kind "disk".
    targets = sorted(
        {t.name.upper() for t in tiers} | {k.upper() for k in TIER_KINDS}, key=len, reverse=True
    )
    per_tier: dict[str, dict[str, str]] = {}
    for var in sorted(env):
        if not var.startswith("KVTIER_") or var in ("KVTIER_CONFIG", MASTER_KEY_VAR, GATE_VAR):
            continue
        rest = var[len("KVTIER_") :]
        if rest in store_fields:
            top[rest.lower()] = env[var]
            continue
        target = next((t for t in targets if rest.startswith(t + "_")), None)
        if target is None:
            raise ConfigError(
                f"{var}: unknown variable; use KVTIER_CONFIG, KVTIER_CHUNK_TOKENS,"
                f" KVTIER_WRITE_QUEUE, KVTIER_RETRY_AFTER_S or KVTIER_<TIER>_<FIELD> with a tier"
                f" name ({', '.join(t.name for t in tiers)}) or kind ({', '.join(TIER_KINDS)})"
            )
        per_tier.setdefault(target, {})[rest[len(target) + 1 :].lower()] = env[var]
    for target, values in per_tier.items():
        where = f"KVTIER_{target}_"
        if "kind" in values:
            raise ConfigError(f"{where}KIND: a tier's kind cannot be set from the environment")
        index = next((i for i, t in enumerate(tiers) if t.name.upper() == target), None)
        same_kind = [t.name for t in tiers if t.kind.upper() == target]
        if index is None and same_kind:
            first = next(iter(values))
            raise ConfigError(
                f"{where}{first.upper()}: the {target.lower()} tier here is named"
                f" {same_kind[0]!r}; use KVTIER_{same_kind[0].upper()}_{first.upper()}"
            )
        if index is None:  # a kind with no tier of that name yet: add one
            tiers.append(_tier_from({"kind": target.lower(), **values}, where, env=True))
        else:
            current = {**dataclasses.asdict(tiers[index]), **values}
            tiers[index] = _tier_from(current, where, env=True)
    merged = {k: v for k, v in dataclasses.asdict(config).items() if k != "tiers"}
    merged.update(top)
    base: StoreConfig = _build(StoreConfig, merged, "KVTIER_", env=True)
    try:
        return dataclasses.replace(base, tiers=tuple(tiers))
    except ConfigError as exc:
        raise ConfigError(f"environment: {exc}") from None


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> StoreConfig:
    """Defaults, then the YAML file (``path`` or $KVTIER_CONFIG), then ``KVTIER_*`` variables."""
    env = os.environ if env is None else env
    path = path or env.get("KVTIER_CONFIG") or None
    config = StoreConfig()
    if path is not None:
        file = Path(path).expanduser()
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"config file {file}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {file}: not valid YAML: {exc}") from None
        config = config_from_dict(data or {}, str(file))
    return _apply_env(config, env)


def read_secret(path: str, what: str) -> str:
    """The secret held by the file ``path`` (its first line, stripped); errors name the file
    and never its content."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{what}: {path} is empty")
    return secret
