"""Quotas through a real store (open_store with a tenants file): one tenant floods a tier
while another repeats its prompts; the victim keeps its hit rate. And without quotas the
same flood takes it away (the test can fail)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kvtier import Namespace, codec
from kvtier.config import DiskTierConfig, MemoryTierConfig, StoreConfig, TierConfig
from kvtier.errors import ConfigError
from kvtier.factory import open_store
from kvtier.keys import ChunkKey
from kvtier.tenants import hash_key, load_tenants, new_secret, tenant_id

from kvhelpers import CHUNK_TOKENS, NS, chunks_for, prompt

CHUNK = len(codec.encode(ChunkKey(b"k" * 16), chunks_for(0, 1)[0], NS.id(CHUNK_TOKENS)))
VICTIM_PROMPTS = 5  # one chunk each: within its half of a 12-chunk tier
ROUNDS = 8
FLOOD_PER_ROUND = 25


def tenants_file(tmp_path: Path, quota: str = "") -> Path:
    (tmp_path / "salts.secret").write_text(new_secret())
    lines = ["secret_file: salts.secret", "anonymous: refuse", "tenants:"]
    for name in ("victim", "flood"):
        lines += [f"  - name: {name}", f"    keys: ['{hash_key('key-' + name)}']"]
        if quota and name == "flood":
            lines.append(f"    quota: {{{quota}}}")
    path = tmp_path / "tenants.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tier(kind: str, tmp_path: Path, chunks: int) -> TierConfig:
    if kind == "memory":
        return MemoryTierConfig(capacity=chunks * CHUNK)
    return DiskTierConfig(path=str(tmp_path / "disk"), capacity=chunks * CHUNK, fsync=False)


def victim_hit_rate(config: StoreConfig, flood: bool) -> float:
    """The victim's share of lookups that hit after its first round; an engine's part:
    a hit is loaded, a miss computes the chunk and stores it. (The second call on a disk
    tier finds the first's chunks: a restart.)"""
    tenants = load_tenants(config.tenants_file) if config.tenants_file else None

    def namespace(name: str) -> Namespace:
        salt = tenants.salt(name, None) if tenants else name
        return dataclasses.replace(NS, tenant_salt=salt)

    victim, attacker = namespace("victim"), namespace("flood")
    hits = lookups = 0
    with open_store(config) as store:
        for r in range(ROUNDS):
            for p in range(VICTIM_PROMPTS):
                tokens = prompt(p, 1)
                hit = store.lookup(tokens, victim).hit_chunks
                if r > 0:
                    hits, lookups = hits + hit, lookups + 1
                if hit:
                    assert store.get(tokens, victim).chunks  # loads it, as an engine does
                else:
                    store.put(tokens, victim, chunks_for(p, 1))
                for f in range(FLOOD_PER_ROUND // VICTIM_PROMPTS if flood else 0):
                    seed = 1000 + (r * VICTIM_PROMPTS + p) * FLOOD_PER_ROUND + f
                    store.put(prompt(seed, 1), attacker, chunks_for(seed, 1))
            store.flush()
        if tenants is not None and flood:
            states = store.owner_states()
            ids = {tenant_id(n, tenants.secret): n for n in ("victim", "flood")}
            named = {ids[t]: tiers for t, tiers in states.items() if t in ids}
            only = next(iter(named["flood"].values()))
            assert only["evictions"] > 0 and next(iter(named["victim"].values()))["evictions"] == 0
    return hits / lookups


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_flood_does_not_take_the_victims_hits(tmp_path: Path, kind: str) -> None:
    config = StoreConfig(
        CHUNK_TOKENS, tiers=(tier(kind, tmp_path, 12),), tenants_file=str(tenants_file(tmp_path))
    )
    alone = victim_hit_rate(config, flood=False)
    flooded = victim_hit_rate(config, flood=True)
    assert alone == 1.0
    assert flooded >= alone - 0.05, f"the victim's hit rate fell from {alone} to {flooded}"


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_without_quotas_the_flood_takes_them(tmp_path: Path, kind: str) -> None:
    config = StoreConfig(CHUNK_TOKENS, tiers=(tier(kind, tmp_path, 12),))
    assert victim_hit_rate(config, flood=False) == 1.0
    assert victim_hit_rate(config, flood=True) < 0.5


def test_a_quota_caps_a_tenant_in_an_otherwise_empty_tier(tmp_path: Path) -> None:
    path = tenants_file(tmp_path, quota=f"memory: {3 * CHUNK}")
    tenants = load_tenants(path)
    config = StoreConfig(
        CHUNK_TOKENS, tiers=(tier("memory", tmp_path, 100),), tenants_file=str(path)
    )
    flood = dataclasses.replace(NS, tenant_salt=tenants.salt("flood", None))
    with open_store(config) as store:
        for seed in range(10):
            store.put(prompt(seed, 1), flood, chunks_for(seed, 1))
        held = [store.lookup(prompt(seed, 1), flood).hit_chunks for seed in range(10)]
        assert held == [0] * 7 + [1] * 3
        part = store.owner_states()[tenant_id("flood", tenants.secret)]["memory"]
        assert part["used_bytes"] <= 3 * CHUNK and part["quota"] == 1


def test_quotas_must_name_a_tier_kvtier_bounds(tmp_path: Path) -> None:
    path = tenants_file(tmp_path, quota="redis: 1GiB")
    with pytest.raises(ConfigError, match=r"quota\.redis: no such tier here"):
        open_store(StoreConfig(tiers=(tier("memory", tmp_path, 4),), tenants_file=str(path)))
    path = tenants_file(tmp_path, quota="memory: 1TiB")
    with pytest.raises(ConfigError, match="more than the tier's capacity"):
        open_store(StoreConfig(tiers=(tier("memory", tmp_path, 4),), tenants_file=str(path)))


def test_the_readmes_quota_line_is_what_a_tenants_file_takes(tmp_path: Path) -> None:
    from paths import README

    found = re.search(r"`(quota: \{memory: [^`]+\})`", README.read_text().replace("\n", " "))
    assert found, "the README shows a quota line"
    line = found[1]
    path = tenants_file(tmp_path, quota=line.split("{", 1)[1].rstrip("}"))
    tenants = load_tenants(path)
    flood = next(t for t in tenants.tenants if t.name == "flood")
    assert flood.quota == {"memory": 512 * 2**20, "disk": 5 * 2**30}
    tiers = (MemoryTierConfig(capacity=2**30), DiskTierConfig(path=str(tmp_path / "d")))
    with open_store(StoreConfig(tiers=tiers, tenants_file=str(path))) as store:
        states = store.owner_states()[tenant_id("flood", tenants.secret)]
        assert states["memory"]["share_bytes"] == 512 * 2**20 and states["disk"]["quota"] == 1


def test_chunks_found_at_start_are_unknown_until_their_first_use(tmp_path: Path) -> None:
    """A disk tier in clear, reopened: it cannot tell whose its chunks are until a request
    of their namespace reads one; they count as "unknown" (no share: they go first) and
    move into their tenant's share when used."""
    path = tenants_file(tmp_path)
    tenants = load_tenants(path)
    victim = dataclasses.replace(NS, tenant_salt=tenants.salt("victim", None))
    config = StoreConfig(CHUNK_TOKENS, tiers=(tier("disk", tmp_path, 12),), tenants_file=str(path))
    with open_store(config) as store:
        for p in range(3):
            store.put(prompt(p, 1), victim, chunks_for(p, 1))
    me = tenant_id("victim", tenants.secret)
    with open_store(config) as store:  # a restart
        before = store.owner_states()
        assert before["unknown"]["disk"]["used_bytes"] == 3 * CHUNK
        assert before["unknown"]["disk"]["share_bytes"] == 0
        assert before[me]["disk"]["used_bytes"] == 0
        assert store.get(prompt(0, 1), victim).chunks
        after = store.owner_states()
        assert after[me]["disk"]["used_bytes"] == CHUNK
        assert after["unknown"]["disk"]["used_bytes"] == 2 * CHUNK
