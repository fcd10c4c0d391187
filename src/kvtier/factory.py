"""From configuration to live objects: ``make_tier`` and ``open_store``."""

from __future__ import annotations

from kvtier.codec import Compression
from kvtier.config import (
    DiskTierConfig,
    MemoryTierConfig,
    RedisTierConfig,
    StoreConfig,
    TierConfig,
)
from kvtier.policy.eviction import make_eviction_policy
from kvtier.store import TieredStore
from kvtier.tiers import DiskTier, MemoryTier, RedisTier, Tier


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
            username=config.username,
            password_file=config.password_file,
        )
    raise TypeError(f"not a tier configuration: {config!r}")


def open_store(config: StoreConfig) -> TieredStore:
    """Build the tiers ``config`` lists and a store over them."""
    tiers: list[Tier] = []
    try:
        for tier_config in config.tiers:
            tiers.append(make_tier(tier_config))
    except Exception:
        for tier in tiers:
            tier.close()
        raise
    return TieredStore(
        tiers,
        chunk_tokens=config.chunk_tokens,
        compression=[Compression.named(t.compression) for t in config.tiers],
        write_queue=config.write_queue,
        retry_after_s=config.retry_after_s,
    )
