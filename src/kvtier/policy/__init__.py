"""Policies, kept apart from the mechanisms that use them (the store's tiers and the simulator)."""

from kvtier.policy.eviction import (
    POLICY_NAMES,
    EvictionPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    make_eviction_policy,
)

__all__ = ["POLICY_NAMES", "EvictionPolicy", "LRUPolicy", "S3FIFOPolicy", "make_eviction_policy"]
