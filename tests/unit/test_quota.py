"""Quotas: a tier divided among tenants, so that no tenant evicts another."""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from kvtier.policy import POLICY_NAMES, make_eviction_policy
from kvtier.policy.quota import QuotaPolicy

A, B, C = b"tenant-a", b"tenant-b", b"tenant-c"


def quota(name: str = "lru", owners: tuple[bytes, ...] = (A, B), **quotas: int) -> QuotaPolicy:
    given: dict[Hashable, int] = {{"a": A, "b": B, "c": C}[k]: v for k, v in quotas.items()}
    return QuotaPolicy(lambda: make_eviction_policy(name), list(owners), given)


def put(p: QuotaPolicy, key: str, owner: Hashable, capacity: int, size: int = 1) -> bool:
    """What a tier does for a write: evict the victims, then insert (False: rejected)."""
    victims = p.victims(size, capacity, owner)
    if victims is None:
        return False
    assert len(set(victims)) == len(victims), "a key offered twice"
    for victim in victims:
        assert victim in p
        p.remove(victim)
    p.insert(key, size, owner)
    assert p.used_bytes <= capacity
    return True


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_flood_from_one_tenant_leaves_the_other_tenants_chunks(name: str) -> None:
    p = quota(name)
    for i in range(4):  # the victim's working set: within its half
        assert put(p, f"a{i}", A, 10)
    for i in range(200):  # the flood
        assert put(p, f"b{i}", B, 10)
        if i % 10 == 0:
            for j in range(4):
                p.touch(f"a{j}")
    assert all(f"a{i}" in p for i in range(4))
    assert p.used_of(B) == 6  # it took what the victim left free, no more
    usage = p.usage(10)
    assert usage[A].evictions == 0 and usage[B].evictions == 194


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_without_quotas_the_same_flood_evicts_the_victim(name: str) -> None:
    """The test above can fail: one policy for all, the flood takes the victim's chunks."""
    p = make_eviction_policy(name)
    for i in range(4):
        p.insert(f"a{i}", 1)
    for i in range(200):
        victims = p.victims(1, 10)
        assert victims is not None
        for v in victims:
            p.remove(v)
        p.insert(f"b{i}", 1)
    assert not any(f"a{i}" in p for i in range(4))


def test_a_tenant_alone_may_fill_the_tier_and_gives_back_its_excess_first() -> None:
    p = quota()
    for i in range(10):
        assert put(p, f"a{i}", A, 10)
    assert p.used_of(A) == 10  # shares bind only under pressure
    assert put(p, "b0", B, 10)  # the tier is full: A is over its share, it gives back
    assert "a0" not in p and "b0" in p
    for i in range(1, 5):
        assert put(p, f"b{i}", B, 10)
    assert p.used_of(A) == 5 and p.used_of(B) == 5  # both at their share now
    assert put(p, "b5", B, 10)  # B over its share: its own oldest goes, not A's
    assert "b0" not in p and p.used_of(A) == 5


def test_a_quota_is_a_hard_limit_even_in_an_empty_tier() -> None:
    p = quota(a=3)
    for i in range(6):
        assert put(p, f"a{i}", A, 100)
    assert p.used_of(A) == 3 and [f"a{i}" in p for i in range(6)] == [False] * 3 + [True] * 3
    assert not put(p, "big", A, 100, size=4)  # more than its quota: rejected
    assert p.share_of(A, 100) == 3 and p.share_of(B, 100) == 50
    assert p.usage(100)[A].quota and not p.usage(100)[B].quota


def test_chunks_without_a_known_owner_go_first() -> None:
    p = quota()
    for i in range(4):
        p.insert(f"old{i}", 1, None)  # found on disk after a restart, owner unknown
    for i in range(6):
        assert put(p, f"a{i}", A, 10)
    assert put(p, "a6", A, 10)  # A is over its share (5) but the unknown have none
    assert "old0" not in p and "a0" in p
    assert p.share_of(None, 10) == 0 and p.usage(10)[None].used_bytes == 3


def test_pinned_chunks_are_never_victims_and_pins_may_come_first() -> None:
    p = quota()
    p.pin("a0")  # a reader pins a chunk on its way in
    for i in range(5):
        assert put(p, f"a{i}", A, 5)
    for i in range(5):
        assert put(p, f"b{i}", B, 5)
    assert "a0" in p  # pinned through all of B's writes
    held_b = [f"b{i}" for i in range(5) if f"b{i}" in p]
    for key in held_b[:2]:
        p.pin(key)
    pinned = {"a0", *held_b[:2]}
    free = 5 - len(pinned)
    assert p.victims(free + 1, 5, A) is None  # cannot fit without a pinned one
    victims = p.victims(free, 5, A)
    assert victims is not None and not set(victims) & pinned
    p.unpin("a0")
    p.unpin("a0")  # one pin too many: harmless
    assert "a0" in p


def test_a_key_rewritten_by_another_owner_moves_with_its_pins() -> None:
    p = quota()
    p.insert("k", 2, A)
    p.pin("k")
    p.insert("k", 3, B)
    assert p.used_of(A) == 0 and p.used_of(B) == 3 and p.used_bytes == 3
    assert p.victims(3, 3, A) is None  # "k" is still pinned where it went
    p.unpin("k")
    assert p.victims(3, 3, A) == ["k"]


def test_three_tenants_share_by_three_and_the_furthest_over_gives_back_first() -> None:
    p = quota(owners=(A, B, C))
    for i in range(9):
        assert put(p, f"a{i}", A, 12)
    for i in range(3):
        assert put(p, f"b{i}", B, 12)
    # Full: A holds 9 (share 4), B 3. C writes: A gives back, B keeps all of its 3.
    for i in range(4):
        assert put(p, f"c{i}", C, 12)
    assert p.used_of(B) == 3 and p.used_of(C) == 4 and p.used_of(A) == 5


def test_bad_quotas_are_refused() -> None:
    with pytest.raises(ValueError, match="not an owner"):
        QuotaPolicy(lambda: make_eviction_policy("lru"), [A], {B: 3})
    with pytest.raises(ValueError, match="must be positive"):
        QuotaPolicy(lambda: make_eviction_policy("lru"), [A], {A: 0})
    with pytest.raises(ValueError, match="at least one owner"):
        QuotaPolicy(lambda: make_eviction_policy("lru"), [])


def test_the_worker_reports_evictions_since_its_last_report() -> None:
    """The store counts evictions from its start; the engine's metrics add up reports, so
    the worker sends what grew (a count that went down: a new store, from zero)."""
    from kvtier.integrations.vllm.accounts import ConnectorMetrics
    from kvtier.integrations.vllm.metrics import merge

    metrics = ConnectorMetrics(None)

    def report(evictions: int) -> dict[str, object]:
        part = {"used_bytes": 5, "share_bytes": 9, "quota": 0, "evictions": evictions}
        return metrics._owner_deltas({"ab": {"memory": dict(part)}})

    first, second, third = report(4), report(10), report(3)
    assert [r["ab"]["memory"]["evictions"] for r in (first, second, third)] == [4, 6, 3]  # type: ignore[index]
    merged = merge({"tenant_tiers": first}, {"tenant_tiers": second})
    assert merged["tenant_tiers"]["ab"]["memory"] == {
        "used_bytes": 5,
        "share_bytes": 9,
        "quota": 0,
        "evictions": 10,
    }
