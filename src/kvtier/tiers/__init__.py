"""Storage tiers: the contract (``base``) and the DRAM, disk, Redis and S3 implementations."""

from __future__ import annotations

from kvtier.tiers.base import PutResult, Tier, TierUsage
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.s3 import S3Tier

__all__ = ["DiskTier", "MemoryTier", "PutResult", "RedisTier", "S3Tier", "Tier", "TierUsage"]
