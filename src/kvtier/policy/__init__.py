"""Policies, kept apart from the mechanisms that use them (the store's tiers and the simulator)."""

from kvtier.policy.eviction import EvictionPolicy, LRUPolicy, make_eviction_policy

__all__ = ["EvictionPolicy", "LRUPolicy", "make_eviction_policy"]
