"""Eviction policy: LRU order, sizes and pins."""

from __future__ import annotations

import pytest

from kvtier.policy import POLICY_NAMES, LRUPolicy, S3FIFOPolicy, make_eviction_policy


def test_lru_offers_the_least_recently_used_first() -> None:
    p = LRUPolicy()
    for key in "abcd":
        p.insert(key, 10)
    p.touch("a")
    assert p.used_bytes == 40 and len(p) == 4
    assert p.victims(0, 40) == []
    assert p.victims(15, 40) == ["b", "c"]
    p.remove("b")
    assert p.used_bytes == 30 and "b" not in p


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_reinsert_replaces_the_size(name: str) -> None:
    p = make_eviction_policy(name)
    p.insert("a", 10)
    p.insert("a", 25)
    assert p.used_bytes == 25 and len(p) == 1


def test_pinned_keys_are_never_victims_and_pins_count() -> None:
    p = LRUPolicy()
    for key in "abc":
        p.insert(key, 10)
    p.pin("a")
    p.pin("a")
    assert p.victims(10, 30) == ["b"]
    p.pin("b")
    p.pin("c")
    assert p.victims(10, 30) is None  # cannot fit without touching pinned entries
    p.unpin("a")
    assert p.is_pinned("a")
    p.unpin("a")
    assert p.victims(10, 30) == ["a"]
    p.unpin("zzz")  # unpinning an unknown key is harmless


def test_unknown_policy_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="allowed: lru, s3fifo"):
        make_eviction_policy("fifo")


def put(policy: object, key: str, capacity: int) -> None:
    """What a tier does for a write of one unit: evict the victims, then insert."""
    victims = policy.victims(1, capacity)  # type: ignore[attr-defined]
    assert victims is not None
    for victim in victims:
        policy.remove(victim)  # type: ignore[attr-defined]
    policy.insert(key, 1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_respects_capacity_pins_and_sizes(name: str) -> None:
    p = make_eviction_policy(name)
    for i in range(50):
        put(p, f"k{i}", 10)
        if i % 3 == 0:
            p.touch(f"k{i // 2}")
        assert p.used_bytes <= 10 and len(p) <= 10
    pinned = [k for k in (f"k{i}" for i in range(50)) if k in p][:9]
    for key in pinned:
        p.pin(key)
    victims = p.victims(1, 10)
    assert victims is not None and not set(victims) & set(pinned)
    for victim in victims:
        p.remove(victim)
    p.insert("new", 1)
    assert p.victims(2, 10) is None  # only pinned entries and "new" are left: 1 unit free
    assert all(key in p for key in pinned)
    p.remove("new")
    assert p.used_bytes == 9


def test_s3fifo_keeps_a_reused_key_through_a_scan_that_flushes_lru() -> None:
    results = {}
    for policy in (LRUPolicy(), S3FIFOPolicy()):
        put(policy, "hot", 10)
        policy.touch("hot")
        for i in range(30):  # one-time keys
            put(policy, f"scan{i}", 10)
        results[type(policy).__name__] = "hot" in policy
    assert results == {"LRUPolicy": False, "S3FIFOPolicy": True}


def test_s3fifo_sends_a_key_back_soon_after_eviction_to_the_main_queue() -> None:
    p = S3FIFOPolicy()
    for i in range(11):  # "k0" leaves the small queue (unused): remembered as a ghost
        put(p, f"k{i}", 10)
    assert "k0" not in p
    put(p, "k0", 10)  # back while remembered: into the main queue
    for i in range(20):
        put(p, f"more{i}", 10)
    assert "k0" in p and "k1" not in p


def test_a_tier_keeps_the_policy_its_configuration_names(tmp_path: object) -> None:
    """An empty policy is falsy (it has a length): a tier once took ``policy or LRU()`` and
    ran LRU whatever the configuration said."""
    from pathlib import Path

    from kvtier.config import DiskTierConfig, MemoryTierConfig
    from kvtier.factory import make_tier

    memory = make_tier(MemoryTierConfig(capacity=1 << 20, eviction="s3fifo"))
    disk = make_tier(DiskTierConfig(path=str(Path(str(tmp_path)) / "d"), eviction="s3fifo"))
    for tier in (memory, disk):
        assert isinstance(tier._policy, S3FIFOPolicy)  # type: ignore[attr-defined]
        tier.close()
