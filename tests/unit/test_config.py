"""Configuration: YAML + KVTIER_* variables into frozen dataclasses; bad input names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier import ConfigError, load_config, open_store
from kvtier.config import (
    DiskTierConfig,
    MemoryTierConfig,
    RedisTierConfig,
    StoreConfig,
    config_from_dict,
    parse_size,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        (8192, 8192),
        ("64 kib", 65536),
        ("3TB", 3 * 10**12),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["2 gigs", "-1GiB", "0", "", True, "GiB"])
def test_bad_sizes_are_rejected_with_the_units(bad: object) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        parse_size(bad, "capacity")


def test_defaults_are_dram_plus_local_disk() -> None:
    config = load_config(env={})
    assert [t.kind for t in config.tiers] == ["memory", "disk"]
    assert config.chunk_tokens == 256


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "kvtier.yaml"
    path.write_text(
        "chunk_tokens: 512\n"
        "write_queue: 8\n"
        "tiers:\n"
        "  - {kind: memory, capacity: 1GiB}\n"
        f"  - {{kind: disk, path: {tmp_path / 'd'}, capacity: 10GiB, compression: zstd}}\n"
        "  - {kind: redis, url: 'redis://127.0.0.1:6379/0', ttl_s: 3600}\n"
    )
    config = load_config(path, env={})
    assert config.chunk_tokens == 512 and config.write_queue == 8
    assert config.tiers == (
        MemoryTierConfig(capacity=2**30),
        DiskTierConfig(path=str(tmp_path / "d"), capacity=10 * 2**30, compression="zstd"),
        RedisTierConfig(url="redis://127.0.0.1:6379/0", ttl_s=3600),
    )
    assert load_config(env={"KVTIER_CONFIG": str(path)}) == config


def test_environment_overrides_and_adds_tiers(tmp_path: Path) -> None:
    env = {
        "KVTIER_CHUNK_TOKENS": "128",
        "KVTIER_MEMORY_CAPACITY": "256MiB",
        "KVTIER_DISK_PATH": str(tmp_path),
        "KVTIER_DISK_FSYNC": "false",
        "KVTIER_REDIS_URL": "redis://10.0.0.5:6379/2",
        "KVTIER_REDIS_TTL_S": "60",
        "UNRELATED": "x",
    }
    config = load_config(env=env)
    assert config.chunk_tokens == 128
    mem, disk, red = config.tiers
    assert isinstance(mem, MemoryTierConfig) and mem.capacity == 256 * 2**20
    assert isinstance(disk, DiskTierConfig) and disk.path == str(tmp_path) and not disk.fsync
    assert isinstance(red, RedisTierConfig) and red.url.endswith("/2") and red.ttl_s == 60


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"chunk_size": 256}, "cfg: chunk_size: unknown key; allowed: chunk_tokens"),
        ({"chunk_tokens": "many"}, "cfg: chunk_tokens: expected int"),
        ({"chunk_tokens": 3}, "cfg: chunk_tokens: must be in [16, 65536]"),
        (
            {"tiers": [{"kind": "tape"}]},
            "cfg: tiers[0].kind: 'tape' is not allowed; allowed: memory, disk, redis",
        ),
        (
            {"tiers": [{"kind": "memory"}, {"kind": "disk", "capacity": "lots"}]},
            "cfg: tiers[1].capacity: expected a size",
        ),
        (
            {"tiers": [{"kind": "disk", "compresion": "zstd"}]},
            "cfg: tiers[0].compresion: unknown key; allowed:",
        ),
        (
            {"tiers": [{"kind": "disk", "compression": "gzip"}]},
            "cfg: tiers[0].compression: 'gzip' is not allowed; allowed: none, zstd, lz4",
        ),
        ({"tiers": [{"kind": "redis", "url": "http://x"}]}, "cfg: tiers[0].url: expected redis://"),
        ({"tiers": [{"kind": "memory"}, {"kind": "memory"}]}, "two tiers are named 'memory'"),
        ({"tiers": []}, "tiers: at least one tier"),
        ({"tiers": "memory"}, "tiers: expected a list"),
        ({"tiers": [{"kind": "disk", "fsync": "maybe"}]}, "cfg: tiers[0].fsync: expected bool"),
    ],
)
def test_bad_configuration_names_the_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, "cfg")
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"KVTIER_DISK_CAPACITY": "abc"}, "KVTIER_DISK_CAPACITY: expected a size"),
        ({"KVTIER_FOO": "1"}, "KVTIER_FOO: unknown variable"),
        ({"KVTIER_DISK_SIZE": "1GiB"}, "KVTIER_DISK_SIZE: unknown key; allowed:"),
        ({"KVTIER_REDIS_TTL_S": "60"}, "KVTIER_REDIS_URL: expected redis://"),
        ({"KVTIER_WRITE_QUEUE": "0"}, "KVTIER_WRITE_QUEUE: must be positive"),
    ],
)
def test_bad_environment_names_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert needle in str(err.value)


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})


def test_configs_are_frozen_and_build_a_working_store(tmp_path: Path) -> None:
    config = StoreConfig(
        chunk_tokens=16,
        tiers=(MemoryTierConfig(capacity=2**20), DiskTierConfig(path=str(tmp_path), fsync=False)),
    )
    with pytest.raises(AttributeError):
        config.chunk_tokens = 32  # type: ignore[misc]
    with open_store(config) as store:
        assert [t.name for t in store.tiers] == ["memory", "disk"]
        assert store.chunk_tokens == 16


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"retry_after_s": float("nan")}, "retry_after_s: expected a finite number"),
        (
            {"tiers": [{"kind": "redis", "url": "redis://h", "timeout_s": float("inf")}]},
            "tiers[0].timeout_s: expected a finite number",
        ),
        (
            {"tiers": [{"kind": "redis", "url": "valkey://h:6379"}]},
            "tiers[0].url: expected redis://",
        ),
        ({"tiers": [{"kind": "memory", "capacity": 2.5}]}, "whole number of bytes"),
        ({"tiers": [{"kind": ["disk"]}]}, "tiers[0].kind: ['disk'] is not allowed"),
        ({1: 2}, "keys must be names"),
        ({"tiers": [{"kind": "memory", "name": ""}]}, "must start with a letter"),
        (
            {"tiers": [{"kind": "memory", "name": "fast"}, {"kind": "disk", "name": "FAST"}]},
            "names ignore case",
        ),
    ],
)
def test_edge_values_are_refused(data: dict[object, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, "cfg")  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_environment_never_adds_a_second_tier_of_a_kind_by_accident(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text("tiers: [{kind: memory, name: dram}, {kind: disk, name: ssd, path: /x}]\n")
    with pytest.raises(ConfigError, match="named 'dram'; use KVTIER_DRAM_CAPACITY"):
        load_config(path, env={"KVTIER_MEMORY_CAPACITY": "1GiB"})
    with pytest.raises(ConfigError, match="KVTIER_SSD_KIND: a tier's kind cannot be set"):
        load_config(path, env={"KVTIER_SSD_KIND": "memory"})
    dram = load_config(path, env={"KVTIER_DRAM_CAPACITY": "1GiB"}).tiers[0]
    assert isinstance(dram, MemoryTierConfig) and dram.capacity == 2**30
