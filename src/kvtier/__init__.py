"""kvtier: inference context memory storage — a tiered store for LLM KV-cache chunks."""

from kvtier.codec import KVChunk
from kvtier.config import StoreConfig, load_config
from kvtier.errors import ConfigError, CorruptChunk, KvtierError, TierUnavailable
from kvtier.factory import open_store
from kvtier.keys import ChunkKey, Namespace, chunk_keys
from kvtier.results import GetResult, LoadResult, LookupResult, PutReport
from kvtier.store import TieredStore

__version__ = "0.1.0"

__all__ = [
    "ChunkKey",
    "ConfigError",
    "CorruptChunk",
    "GetResult",
    "KVChunk",
    "KvtierError",
    "LoadResult",
    "LookupResult",
    "Namespace",
    "PutReport",
    "StoreConfig",
    "TierUnavailable",
    "TieredStore",
    "chunk_keys",
    "load_config",
    "open_store",
]
