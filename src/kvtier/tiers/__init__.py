"""Storage tiers and the factory that builds one from its configuration."""

from __future__ import annotations

from kvtier.config import DiskTierConfig, MemoryTierConfig, RedisTierConfig, TierConfig
from kvtier.policy.eviction import make_eviction_policy
from kvtier.tiers.base import PutResult, Tier, TierUsage
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.redis import RedisTier

__all__ = ["DiskTier", "MemoryTier", "PutResult", "RedisTier", "Tier", "TierUsage", "make_tier"]


def make_tier(config: TierConfig) -> Tier:
    """Open the tier ``config`` describes (connecting lazily where the client allows)."""
    if isinstance(config, MemoryTierConfig):
        return MemoryTier(config.capacity, config.name, make_eviction_policy(config.eviction))
    if isinstance(config, DiskTierConfig):
        return DiskTier(
            config.path,
            config.capacity,
            config.name,
            fsync=config.fsync,
            policy=make_eviction_policy(config.eviction),
        )
    if isinstance(config, RedisTierConfig):
        return RedisTier(
            config.url,
            config.name,
            prefix=config.prefix,
            ttl_s=config.ttl_s,
            cluster=config.cluster,
            timeout_s=config.timeout_s,
        )
    raise TypeError(f"not a tier configuration: {config!r}")
