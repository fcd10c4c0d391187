"""From configuration to live objects: ``make_tier`` and ``open_store``."""

from __future__ import annotations

import os
from collections.abc import Hashable

from kvtier.codec import Compression
from kvtier.config import (
    DiskTierConfig,
    MemoryTierConfig,
    RedisTierConfig,
    S3TierConfig,
    StoreConfig,
    TierConfig,
)
from kvtier.errors import ConfigError
from kvtier.owners import Owners
from kvtier.policy.eviction import EvictionPolicy, make_eviction_policy
from kvtier.policy.quota import QuotaPolicy
from kvtier.sealing import MasterKeys, Sealer
from kvtier.store import TieredStore
from kvtier.tenants import Tenants, load_tenants, tenant_id
from kvtier.tiers import DiskTier, MemoryTier, RedisTier, Tier
from kvtier.tiers.s3 import S3Tier
from kvtier.tiers.s3_client import S3Client
from kvtier.tiers.s3_credentials import load_credentials
from kvtier.tiers.sealed import SealedTier


def make_tier(
    config: TierConfig, tenants: Tenants | None = None, owners: Owners | None = None
) -> Tier:
    """Open the tier ``config`` describes (connecting lazily where the client allows); with
    ``tenants``, a bounded tier divides its room among them (:func:`quota_policy`), telling
    each chunk's tenant by ``owners``."""
    owner_of = owners.of if owners is not None and tenants is not None else None
    if isinstance(config, MemoryTierConfig):
        policy = quota_policy(config, tenants)
        return MemoryTier(config.capacity, config.name, policy, owner_of)
    if isinstance(config, DiskTierConfig):
        return DiskTier(
            config.path,
            config.capacity,
            config.name,
            fsync=config.fsync,
            policy=quota_policy(config, tenants),
            owner_of=owner_of,
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
    if isinstance(config, S3TierConfig):
        return open_s3_tier(config)
    raise TypeError(f"not a tier configuration: {config!r}")


def s3_region(region: str = "") -> str:
    """An S3 tier's region: its own, else the AWS environment's, else us-east-1."""
    env = os.environ
    return region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


def open_s3_tier(config: S3TierConfig, read_only: bool = False, must_list: bool = False) -> S3Tier:
    """The object tier ``config`` describes: its index is listed from the bucket now (a store
    that cannot be listed leaves it empty, unless ``must_list``)."""
    client = S3Client(
        config.endpoint.rstrip("/"),
        config.bucket,
        s3_region(config.region),
        load_credentials(config.profile),
        config.timeout_s,
    )
    try:
        if config.create_bucket and not read_only:
            client.create_bucket()
        return S3Tier(
            client,
            config.capacity,
            config.name,
            prefix=config.prefix,
            policy=make_eviction_policy(config.eviction),
            concurrency=config.concurrency,
            read_only=read_only,
            must_list=must_list,
        )
    except Exception:
        client.close()
        raise


def quota_policy(
    config: MemoryTierConfig | DiskTierConfig, tenants: Tenants | None
) -> EvictionPolicy:
    """The tier's eviction policy; with ``tenants``, one per tenant under a
    :class:`~kvtier.policy.quota.QuotaPolicy`: each tenant's quota in this tier from the
    tenants file, or an equal share of it."""
    if tenants is None:
        return make_eviction_policy(config.eviction)
    ids = {name: bytes.fromhex(tenant_id(name, tenants.secret)) for name in tenants.names}
    quotas: dict[Hashable, int] = {
        ids[t.name]: t.quota[config.name] for t in tenants.tenants if config.name in t.quota
    }
    return QuotaPolicy(lambda: make_eviction_policy(config.eviction), list(ids.values()), quotas)


def check_quotas(config: StoreConfig, tenants: Tenants) -> None:
    """Every quota names a tier of this store that bounds itself, and fits in it."""
    bounded = {t.name: t for t in config.tiers if isinstance(t, MemoryTierConfig | DiskTierConfig)}
    for tenant in tenants.tenants:
        for tier, size in tenant.quota.items():
            where = f"{tenants.source}: tenant {tenant.name!r}: quota.{tier}"
            if tier not in bounded:
                names = ", ".join(bounded) or "none"
                raise ConfigError(
                    f"{where}: no such tier here; quotas apply to the tiers kvtier bounds"
                    f" itself (here: {names}), not Redis (bounded by its maxmemory)"
                )
            if size > bounded[tier].capacity:
                raise ConfigError(f"{where}: {size} bytes, more than the tier's capacity")


def open_store(config: StoreConfig) -> TieredStore:
    """Build the tiers ``config`` lists and a store over them; with master keys, every tier
    below DRAM (DRAM too with ``encrypt_dram``) seals its chunks; with a tenants file, the
    tiers kvtier bounds divide their room among the tenants."""
    keys = MasterKeys.load(config.master_key_file, config.master_key_env)
    tenants = load_tenants(config.tenants_file) if config.tenants_file else None
    if tenants is not None:
        check_quotas(config, tenants)
    owners = Owners()
    sealer = Sealer(keys, owners) if keys is not None else None
    tiers: list[Tier] = []
    try:
        for tier_config in config.tiers:
            tier = make_tier(tier_config, tenants, owners)
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
        owners=owners,
    )
