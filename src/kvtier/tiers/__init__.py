"""Storage tiers: the contract (``base``) and the DRAM, disk and Redis implementations."""

from __future__ import annotations

from kvtier.tiers.base import PutResult, Tier, TierUsage
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.redis import RedisTier

__all__ = ["DiskTier", "MemoryTier", "PutResult", "RedisTier", "Tier", "TierUsage"]
