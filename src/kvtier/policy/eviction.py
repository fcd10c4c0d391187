"""Eviction policies: which entries to drop when a bounded tier needs room.

A policy only keeps bookkeeping (keys, sizes, recency, pins); it never touches data. The tier
that owns it deletes what the policy names. The same objects drive the capacity simulator, so
a policy must not assume anything about the medium.

Pins: a pinned key is never offered as a victim. Pins count, so two readers of one chunk each
pin and unpin it once. Pinning a key the policy does not track is allowed (the chunk may be
on its way in); the pin applies once it is inserted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable
from typing import Protocol


class EvictionPolicy(Protocol):
    """Bookkeeping for one bounded tier. Not thread-safe: the owning tier holds a lock."""

    @property
    def used_bytes(self) -> int:
        """Sum of the sizes of every tracked entry."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, key: Hashable) -> bool: ...

    def insert(self, key: Hashable, size: int) -> None:
        """Track ``key`` with ``size`` bytes as just used (replaces an earlier size)."""

    def size_of(self, key: Hashable) -> int | None:
        """The tracked size of ``key``, or None if it is not tracked."""

    def touch(self, key: Hashable) -> None:
        """Record a use of ``key``; unknown keys are ignored."""

    def remove(self, key: Hashable) -> None:
        """Forget ``key`` (no error if unknown)."""

    def pin(self, key: Hashable) -> None:
        """Protect ``key`` from eviction until a matching :meth:`unpin`."""

    def unpin(self, key: Hashable) -> None:
        """Release one pin of ``key``."""

    def victims(self, need_bytes: int, capacity: int) -> list[Hashable] | None:
        """Keys to evict so that ``need_bytes`` more fit in ``capacity``, least valuable first.

        Returns [] when they already fit, and None when they cannot fit even after evicting
        every unpinned entry (the caller must then reject the write, not evict anything).
        """


class LRUPolicy:
    """Least-recently-used, O(1) per operation."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, int] = OrderedDict()
        self._pins: Counter[Hashable] = Counter()
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def insert(self, key: Hashable, size: int) -> None:
        old = self._order.pop(key, None)
        if old is not None:
            self._used -= old
        self._order[key] = size
        self._used += size

    def size_of(self, key: Hashable) -> int | None:
        return self._order.get(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        size = self._order.pop(key, None)
        if size is not None:
            self._used -= size

    def pin(self, key: Hashable) -> None:
        self._pins[key] += 1

    def unpin(self, key: Hashable) -> None:
        count = self._pins.get(key, 0)
        if count <= 1:
            self._pins.pop(key, None)
        else:
            self._pins[key] = count - 1

    def is_pinned(self, key: Hashable) -> bool:
        return key in self._pins

    def victims(self, need_bytes: int, capacity: int) -> list[Hashable] | None:
        excess = self._used + need_bytes - capacity
        if excess <= 0:
            return []
        chosen: list[Hashable] = []
        for key, size in self._order.items():  # oldest first
            if key in self._pins:
                continue
            chosen.append(key)
            excess -= size
            if excess <= 0:
                return chosen
        return None


_POLICIES = {"lru": LRUPolicy}


def make_eviction_policy(name: str) -> LRUPolicy:
    """The policy called ``name`` (config value); raises ValueError naming the allowed ones."""
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; allowed: {', '.join(_POLICIES)}"
        ) from None
