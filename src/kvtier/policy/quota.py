"""Quotas: a bounded tier divided among owners (tenants), so that no owner evicts another.

Each owner's entries are kept by a policy of their own (LRU or S3-FIFO, the tier's choice),
and :meth:`QuotaPolicy.victims` decides whose entries make room for a write, in this order:

1. An owner with a **quota** (bytes, from the tenants file) never holds more: a write that
   would take it over evicts its own entries first, whether or not the tier is full.
2. When the tier is full, its **share** decides: every owner may hold ``capacity / owners``
   (or its quota). A writer over its share evicts its own entries; then owners over their
   share give back, the furthest over first; only then the writer's own and the others',
   the largest first. Shares bind only under pressure: a tenant alone may fill the tier.
3. Entries of an owner the policy was not told of have no share: they go first. The store
   gives it the chunks whose tenant a tier cannot tell (:data:`kvtier.owners.NO_TENANT`:
   found on disk at start, in clear, before their namespace is known).

A tenant that floods the tier therefore churns through its own share and leaves the others'
entries where they are. Not thread-safe (the owning tier holds a lock), like every policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from kvtier.policy.eviction import EvictionPolicy

_ABSENT = object()  # not a key's owner (None is one: an owner the tier cannot tell)


@dataclass(frozen=True)
class OwnerUsage:
    """One owner's part of a tier."""

    used_bytes: int
    share_bytes: int  # its quota, or its equal share of the tier's capacity
    quota: bool  # whether share_bytes is a quota (a hard limit) or an equal share
    evictions: int  # entries evicted since the start


class QuotaPolicy:
    """An eviction policy per owner, and quotas between them (see the module's docstring).

    ``owners``: the owners a share is kept for (the tenants a server knows); ``quotas``: the
    bytes some of them may hold at most in this tier. Entries of other owners (``None``
    included) have a share of 0.
    """

    def __init__(
        self,
        make_inner: Callable[[], EvictionPolicy],
        owners: list[Hashable],
        quotas: Mapping[Hashable, int] | None = None,
    ):
        if not owners:
            raise ValueError("a quota policy needs at least one owner")
        quotas = dict(quotas or {})
        for owner, size in quotas.items():
            if owner not in owners:
                raise ValueError(f"a quota for {owner!r}, which is not an owner")
            if size <= 0:
                raise ValueError(f"the quota of {owner!r} must be positive, got {size}")
        self._make = make_inner
        self._owners = list(dict.fromkeys(owners))
        self._quotas = quotas
        self._inner: dict[Hashable, EvictionPolicy] = {}
        self._owner: dict[Hashable, Hashable] = {}  # key -> owner
        self._pins: Counter[Hashable] = Counter()
        self._evictions: Counter[Hashable] = Counter()
        self._used = 0

    # -- EvictionPolicy ---------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._owner

    def size_of(self, key: Hashable) -> int | None:
        owner = self._owner.get(key, _ABSENT)
        return None if owner is _ABSENT else self._inner[owner].size_of(key)

    def insert(self, key: Hashable, size: int, owner: Hashable = None) -> None:
        if self._owner.get(key, _ABSENT) not in (_ABSENT, owner):
            self.remove(key)  # rewritten by another owner: it moves
        inner = self._inner.get(owner)
        if inner is None:
            inner = self._inner[owner] = self._make()
        before = inner.used_bytes
        if key not in inner:
            for _ in range(self._pins.get(key, 0)):
                inner.pin(key)
        inner.insert(key, size)
        self._owner[key] = owner
        self._used += inner.used_bytes - before

    def touch(self, key: Hashable) -> None:
        owner = self._owner.get(key, _ABSENT)
        if owner is not _ABSENT:
            self._inner[owner].touch(key)

    def remove(self, key: Hashable) -> None:
        owner = self._owner.pop(key, _ABSENT)
        if owner is _ABSENT:
            return
        inner = self._inner[owner]
        before = inner.used_bytes
        inner.remove(key)
        for _ in range(self._pins.get(key, 0)):
            inner.unpin(key)  # the pins stay here, for the key's next insert
        self._used -= before - inner.used_bytes

    def pin(self, key: Hashable) -> None:
        self._pins[key] += 1
        owner = self._owner.get(key, _ABSENT)
        if owner is not _ABSENT:
            self._inner[owner].pin(key)

    def unpin(self, key: Hashable) -> None:
        if key not in self._pins:
            return
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]
        owner = self._owner.get(key, _ABSENT)
        if owner is not _ABSENT:
            self._inner[owner].unpin(key)

    def victims(
        self, need_bytes: int, capacity: int, owner: Hashable = None
    ) -> list[Hashable] | None:
        quota = self._quotas.get(owner)
        over_quota = 0 if quota is None else self.used_of(owner) + need_bytes - quota
        over_tier = self._used + need_bytes - capacity
        if over_quota <= 0 and over_tier <= 0:
            return []  # it fits (most writes)
        free = {o: self._evictable(o) for o in self._inner}
        if over_quota > free.get(owner, 0) or over_tier > sum(free.values()):
            return None  # cannot fit, even evicting every unpinned entry it may
        # How much each owner gives back; each inner policy is asked once, as it expects.
        plan: Counter[Hashable] = Counter()
        if over_quota > 0:
            plan[owner] = over_quota
        left = over_tier - plan[owner]
        for victim in self._order(owner, need_bytes, capacity):
            over_share = self._excess(victim, owner, need_bytes, capacity) - plan[victim]
            amount = min(left, over_share, free[victim] - plan[victim])
            if amount > 0:
                plan[victim] += amount
                left -= amount
        for victim in sorted(free, key=lambda o: (o != owner, -free[o])):
            amount = min(left, free[victim] - plan[victim])
            if amount > 0:
                plan[victim] += amount
                left -= amount
        chosen: list[Hashable] = []
        for victim, amount in plan.items():
            self._take(victim, amount, chosen)
        return chosen

    # -- quotas -----------------------------------------------------------------------------

    def share_of(self, owner: Hashable, capacity: int) -> int:
        """The bytes ``owner`` may keep when the tier is full: its quota, or an equal share
        (0 for an owner the policy was not told of)."""
        quota = self._quotas.get(owner)
        if quota is not None:
            return quota
        return capacity // len(self._owners) if owner in self._owners else 0

    def knows(self, owner: Hashable) -> bool:
        """Whether ``owner`` is one the policy keeps a share for."""
        return owner in self._owners

    def unowned(self, key: Hashable) -> bool:
        """Whether ``key`` is held for an owner the policy keeps no share for (its owner
        was not known when it was inserted: the tier may tell it again)."""
        owner = self._owner.get(key, _ABSENT)
        return owner is not _ABSENT and owner not in self._owners

    def used_of(self, owner: Hashable) -> int:
        inner = self._inner.get(owner)
        return inner.used_bytes if inner is not None else 0

    def usage(self, capacity: int) -> dict[Hashable, OwnerUsage]:
        """Each known owner's part, and that of any other owner holding entries."""
        owners = [*self._owners, *(o for o in self._inner if o not in self._owners)]
        return {
            o: OwnerUsage(
                self.used_of(o), self.share_of(o, capacity), o in self._quotas, self._evictions[o]
            )
            for o in owners
        }

    def _excess(self, owner: Hashable, writer: Hashable, need: int, capacity: int) -> int:
        """How far ``owner`` is over its share, counting the write if it is the writer's."""
        extra = need if owner == writer else 0
        return self.used_of(owner) + extra - self.share_of(owner, capacity)

    def _order(self, writer: Hashable, need: int, capacity: int) -> list[Hashable]:
        """Owners over their share, in the order they give back: owners without a share
        first, then the writer if it is over its own, then the others, furthest over first."""
        over = [o for o in self._inner if self._excess(o, writer, need, capacity) > 0]
        return sorted(
            over,
            key=lambda o: (
                self.share_of(o, capacity) > 0,
                o != writer,
                -self._excess(o, writer, need, capacity),
            ),
        )

    def _evictable(self, owner: Hashable) -> int:
        inner = self._inner[owner]
        pinned = sum(inner.size_of(k) or 0 for k in self._pins if self._owner.get(k) == owner)
        return inner.used_bytes - pinned

    def _take(self, owner: Hashable, amount: int, chosen: list[Hashable]) -> None:
        """Add at least ``amount`` bytes of ``owner``'s entries to ``chosen``, in the order
        of its own policy (at most ``amount`` of them are pinned: it finds them)."""
        inner = self._inner[owner]
        keys = inner.victims(amount, inner.used_bytes)
        assert keys is not None, "asked for no more than its unpinned bytes"
        chosen.extend(keys)
        self._evictions[owner] += len(keys)


def owner_usage(policy: EvictionPolicy, capacity: int) -> dict[Hashable, OwnerUsage]:
    """Each owner's part of a tier whose policy is ``policy`` (empty unless it is a quota
    policy)."""
    return policy.usage(capacity) if isinstance(policy, QuotaPolicy) else {}
