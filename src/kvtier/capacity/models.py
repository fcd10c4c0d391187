"""What a model's KV cache weighs: architectures from a Hugging Face ``config.json`` or presets.

Bytes of KV per token:

- multi-head / grouped-query attention: ``2 (K and V) x layers x kv_heads x head_dim x bytes``;
- multi-head latent attention (DeepSeek-V2/V3): one latent per layer,
  ``layers x (kv_lora_rank + qk_rope_head_dim) x bytes`` (no K/V pair, no heads).

Compute per token (for the recompute estimate): ``2 x active parameters`` for the matrix
multiplications plus the attention scores, which grow with the context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError

# bytes per KV element; fp4 packs two values a byte (scales not counted)
KV_DTYPES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "fp4": 0.5}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    params: float  # total parameters
    active_params: float  # parameters used per token (MoE: the routed experts only)
    mla_latent: int = 0  # kv_lora_rank + qk_rope_head_dim for MLA models, else 0

    def kv_elements_per_token(self) -> int:
        if self.mla_latent:
            return self.layers * self.mla_latent
        return 2 * self.layers * self.kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        if dtype not in KV_DTYPES:
            raise ConfigError(f"KV dtype {dtype!r}: allowed {', '.join(KV_DTYPES)}")
        return int(self.kv_elements_per_token() * KV_DTYPES[dtype])

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs to compute the KV of ``tokens`` prompt tokens from scratch (causal)."""
        dense = 2.0 * self.active_params * tokens
        attention = 2.0 * self.layers * self.attention_heads * self.head_dim * tokens * tokens
        return dense + attention


PRESETS: dict[str, ModelSpec] = {
    m.name.lower(): m
    for m in (
        ModelSpec("Llama-3.1-8B", 32, 32, 8, 128, 8.03e9, 8.03e9),
        ModelSpec("Llama-3.1-70B", 80, 64, 8, 128, 70.6e9, 70.6e9),
        ModelSpec("Llama-3.1-405B", 126, 128, 8, 128, 405.9e9, 405.9e9),
        ModelSpec("Qwen2.5-7B", 28, 28, 4, 128, 7.62e9, 7.62e9),
        ModelSpec("Qwen2.5-72B", 80, 64, 8, 128, 72.7e9, 72.7e9),
        # MLA: kv_lora_rank 512 + qk_rope_head_dim 64; 128 heads of 192 (q/k) for the scores
        ModelSpec("DeepSeek-V3", 61, 128, 1, 192, 671e9, 37e9, mla_latent=576),
        ModelSpec("SmolLM2-135M", 30, 9, 3, 64, 134.5e6, 134.5e6),
    )
}


def load_model(name_or_path: str) -> ModelSpec:
    """A preset by name (any case), or the architecture in a ``config.json`` / model folder."""
    preset = PRESETS.get(name_or_path.lower())
    if preset is not None:
        return preset
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model {name_or_path!r}: not a preset ({', '.join(m.name for m in PRESETS.values())})"
            " nor a config.json or model folder"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read a JSON model config: {exc}") from None
    return from_hf_config(config, path.parent.name or str(path))


def from_hf_config(config: dict[str, Any], name: str) -> ModelSpec:
    """The KV-relevant architecture in a Hugging Face ``config.json``."""
    cfg = config.get("text_config", config)  # multimodal configs nest the language model

    def need(key: str) -> int:
        value = cfg.get(key)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}: config.json lacks a positive integer {key!r}")
        return value

    layers, hidden, heads = (
        need("num_hidden_layers"),
        need("hidden_size"),
        need("num_attention_heads"),
    )
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    latent = 0
    if cfg.get("kv_lora_rank"):  # multi-head latent attention
        latent = need("kv_lora_rank") + int(cfg.get("qk_rope_head_dim") or 0)
        head_dim = int(cfg.get("qk_nope_head_dim") or 0) + int(cfg.get("qk_rope_head_dim") or 0)
        head_dim = head_dim or hidden // heads
    params = _estimate_params(cfg, layers, hidden, heads, kv_heads, head_dim)
    active = params
    experts, per_token = (
        cfg.get("n_routed_experts") or cfg.get("num_local_experts"),
        (cfg.get("num_experts_per_tok") or 0),
    )
    if experts and per_token:
        moe = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0
        expert_params = 3 * hidden * moe * layers
        active = params - expert_params * (experts - per_token)
    return ModelSpec(
        name, layers, heads, int(kv_heads), int(head_dim), params, active, mla_latent=latent
    )


def _estimate_params(
    cfg: dict[str, Any], layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int
) -> float:
    """Parameters of a decoder-only transformer with gated MLPs (what the config implies)."""
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0)
    moe = int(cfg.get("moe_intermediate_size") or inter)
    attention = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = 3 * hidden * (moe * experts if experts else inter)
    vocab = int(cfg.get("vocab_size") or 0)
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return float(layers * (attention + mlp) + embeddings)
