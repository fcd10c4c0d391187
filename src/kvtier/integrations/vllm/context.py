"""What both sides of the connector derive from vLLM's configuration, alike in every process:
the connector's own options, kvtier's configuration, the block and chunk sizes, the namespace of
every key, and the process's store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier.config import LOAD_MODES, StoreConfig, config_from_dict
from kvtier.errors import ConfigError
from kvtier.integrations import shared_stores
from kvtier.integrations.model import model_fingerprint
from kvtier.integrations.vllm.paged import kv_dtype_name
from kvtier.keys import KV_LAYOUT, PACKED_LAYOUT, Namespace, tail_granule
from kvtier.store import TieredStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("kvtier")
if not log.handlers:  # inside vLLM nobody configures kvtier's logger: say what happens
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("kvtier %(levelname)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

WHERE = "kv_connector_extra_config"


@dataclass(frozen=True)
class ConnectorOptions:
    """The connector's own keys in ``kv_connector_extra_config`` (the rest is the store's
    configuration): how hits load, the router feed's port, where vLLM publishes its KV
    events, write-through (a prefill engine's answer must not return before its chunks
    are in every tier: the decode engine loads them from the shared one), the engine's
    dtype as ``kvtier serve`` chose it (reported in ``/kvtier/info``), the options of the
    hits-first scheduler (read by :mod:`.hits_first`, which runs without the connector too),
    and whether a request's generated tokens are saved when it ends (``save_outputs``: a
    returning chat turn's prompt holds the previous answer, whose KV the decode computed)."""

    loads: str = "auto"
    feed_port: int | None = None
    kv_events: dict[str, Any] | None = None
    write_through: bool = False
    engine_dtype: dict[str, Any] | None = None
    scheduling: dict[str, Any] | None = None  # the hits-first scheduler's (see .hits_first)
    save_outputs: bool = True

    @classmethod
    def take(cls, extra: dict[str, Any]) -> ConnectorOptions:
        """The options, popped from ``extra``; bad values raise ConfigError."""
        options = cls(
            loads=extra.pop("loads", "auto"),
            feed_port=extra.pop("feed_port", None),
            kv_events=extra.pop("kv_events", None),
            write_through=extra.pop("write_through", False),
            engine_dtype=extra.pop("engine_dtype", None),
            scheduling=extra.pop("scheduling", None),
            save_outputs=extra.pop("save_outputs", True),
        )
        if options.loads not in LOAD_MODES:
            expected = ", ".join(LOAD_MODES)
            raise ConfigError(f"{WHERE}: loads: expected one of {expected}, got {options.loads!r}")
        port = options.feed_port
        if port is not None and not (isinstance(port, int) and 0 <= port < 65536):
            raise ConfigError(f"{WHERE}: feed_port: expected a port number, got {port!r}")
        if not isinstance(options.write_through, bool):
            got = options.write_through
            raise ConfigError(f"{WHERE}: write_through: expected true or false, got {got!r}")
        if not isinstance(options.save_outputs, bool):
            got = options.save_outputs
            raise ConfigError(f"{WHERE}: save_outputs: expected true or false, got {got!r}")
        return options


@dataclass
class ConnectorContext:
    """The configuration both sides share. The namespace must be the same on the scheduler
    side, which never sees the cache tensors, and on the worker side: both derive it from the
    configuration."""

    options: ConnectorOptions
    config: StoreConfig
    block_size: int
    chunk: int
    model: str  # the namespace's model name
    revision: str  # the model's fingerprint
    kv_dtype: str
    store: TieredStore
    packed: bool = False  # vLLM's AMX CPU kernel: blocks are moved whole, as opaque bytes

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorContext:
        """Reads ``kv_connector_extra_config``; bad values raise ConfigError. Sets
        ``kv_load_failure_policy=recompute``: a miss must not fail a request."""
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None, "a KV connector runs only with --kv-transfer-config"
        extra = dict(transfer.kv_connector_extra_config or {})
        options = ConnectorOptions.take(extra)  # what kvtier serve adds to the store's config
        config = config_from_dict(extra, WHERE)
        block_size = vllm_config.cache_config.block_size
        chunk = config.chunk_tokens
        if chunk % block_size:
            raise ConfigError(
                f"{WHERE}: chunk_tokens: {chunk} is not a multiple of vLLM's block size"
                f" {block_size}"
            )
        if transfer.kv_load_failure_policy != "recompute":
            log.info("kvtier: setting kv_load_failure_policy=recompute (a miss must not fail)")
            transfer.kv_load_failure_policy = "recompute"
        model = vllm_config.model_config.model
        return cls(
            options,
            config,
            block_size,
            chunk,
            Path(model).name if Path(model).is_dir() else model,
            model_fingerprint(model, vllm_config.model_config.revision),
            kv_dtype_name(
                vllm_config.model_config.dtype, str(vllm_config.cache_config.cache_dtype)
            ),
            shared_stores.acquire(config),
            amx_packed(vllm_config),
        )

    @property
    def granule(self) -> int:
        """Tokens a stored tail (and so a load's end) is a multiple of. (A packed cache's
        tail is stored with its last block whole: see Loader.chunk_shape.)"""
        return tail_granule(self.block_size)

    @property
    def kv_runs(self) -> int:
        """The runs of K and V rows in this cache's chunks (:attr:`kvtier.chunk.KVChunk.runs`):
        a packed cache's blocks hold each head's K, then its V, a block's tokens each."""
        return self.block_size if self.packed else 0

    def namespace(self, salt: str | None) -> Namespace:
        layout = PACKED_LAYOUT if self.packed else KV_LAYOUT
        return Namespace(self.model, self.revision, self.kv_dtype, layout, salt or None)

    def release(self) -> None:
        shared_stores.release(self.config)


def amx_packed(vllm_config: VllmConfig) -> bool:
    """Whether vLLM's CPU attention runs its AMX kernel, whose cache blocks are packed in AMX
    tiles (no per-token view): bf16 on a CPU with AMX tiles, blocks a multiple of 32."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return False
    model, cache = vllm_config.model_config, vllm_config.cache_config
    try:
        isa = _get_attn_isa(model.dtype, cache.block_size, model.get_head_size())
    except Exception:  # a configuration the kernels refuse: vLLM says so itself
        return False
    return bool(isa == "amx")
