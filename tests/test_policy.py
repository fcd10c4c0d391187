"""Eviction policy: LRU order, sizes and pins."""

from __future__ import annotations

import pytest

from kvtier.policy import LRUPolicy, make_eviction_policy


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


def test_reinsert_replaces_the_size() -> None:
    p = LRUPolicy()
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
    with pytest.raises(ValueError, match="allowed: lru"):
        make_eviction_policy("fifo")
