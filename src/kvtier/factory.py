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
from kvtier.sealing import MasterKeys, Sealer
from kvtier.store import TieredStore
from kvtier.tiers import DiskTier, MemoryTier, RedisTier, Tier
from kvtier.tiers.sealed import SealedTier


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
    """Build the tiers ``config`` lists and a store over them; with master keys, every tier
    below DRAM (DRAM too with ``encrypt_dram``) seals its chunks."""
    keys = MasterKeys.load(config.master_key_file, config.master_key_env)
    sealer = Sealer(keys) if keys is not None else None
    tiers: list[Tier] = []
    try:
        for tier_config in config.tiers:
            tier = make_tier(tier_config)
            in_dram = isinstance(tier_config, MemoryTierConfig)
            if sealer is not None and (config.encrypt_dram or not in_dram):
                tier = SealedTier(tier, sealer)
            tiers.append(tier)
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
        sealer=sealer,
    )
