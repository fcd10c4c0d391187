"""The quality gate: which lossy codecs passed ``kvtier bench fidelity --gate`` for a model.

A record per model fingerprint (the hash of its config, as in chunk namespaces), in
``~/.cache/kvtier/fidelity/<fingerprint>.json``: the thresholds, every codec's measures and
those that passed. A codec passes when, against the uncompressed KV of the same run,

- top-1 agreement of the next-token distributions is at least 99% (one position in a hundred
  may pick another token: beyond that, greedy answers drift visibly), less the engine's own
  disagreement: the floor the bench measures by computing the same KV again in 256-token
  pieces, as chunked prefill and every prefix hit do. In fp32 the floor is ~100% and the line
  stays at 99%; in bf16, where near-tied logits flip under any change of rounding, the
  recomputed KV itself agreed on 98.3% of positions (SmolLM2-135M), so a codec may lose one
  point beyond that, not beyond a precision the engine does not have,
- the mean KL divergence is at most 0.01 nats (about the gap between two runs of the same model
  in bf16 and fp32 on CPU, so smaller differences are noise),
- answer accuracy on the facts is within 1 point of the reference's,
- and, where the record holds the served check (``--served``: the same questions answered
  through ``kvtier serve``, a cold server against restarted ones whose Redis tier holds the
  codec), its greedy agreement there at most :data:`kvtier.bench.served.MARGIN` below the
  model-level one: the model runs in transformers, and an engine's cache may hold K and V in
  another layout than the one the codec was measured on.

``kvtier serve`` refuses a lossy codec a model has not passed unless forced, and picks the
smallest one that passed for ``--codec auto``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kvtier import quant
from kvtier.config import GATE_VAR

TOP1_MIN = 0.99  # with a floor of 100%: one point of top-1 agreement below the floor
KL_MEAN_MAX = 0.01
ACCURACY_DROP_MAX = 0.01
# Smallest stored form first: what --codec auto picks among those that passed (among forms
# of one size, the one whose mean KL measured least).
BY_SIZE = ("int4", "int4r", "k8v4", "int8", "int8c", "fp8", "bf16")
assert set(BY_SIZE) == set(quant.LOSSY)


def gate_dir() -> Path:
    return Path(os.environ.get(GATE_VAR, "~/.cache/kvtier/fidelity")).expanduser()


def top1_min(floor: dict[str, Any] | None) -> float:
    """The top-1 agreement a codec needs, given the run's floor row (None: a record from
    before floors were measured, held to :data:`TOP1_MIN`)."""
    return TOP1_MIN - (1.0 - floor["top1_agreement"]) if floor else TOP1_MIN


def passes(
    row: dict[str, Any], reference_accuracy: float, floor: dict[str, Any] | None = None
) -> bool:
    return bool(
        row["top1_agreement"] >= top1_min(floor)
        and row["kl_mean"] <= KL_MEAN_MAX
        and row["accuracy"] >= reference_accuracy - ACCURACY_DROP_MAX
    )


def record(fingerprint: str, model: str, dtype: str, result: dict[str, Any]) -> Path:
    """Write the gate's record for ``fingerprint`` from a fidelity result; its path."""
    floor = result.get("floor")
    failed_served = {r["codec"] for r in _served_rows(result) if r.get("passed") is False}
    passed = [
        r["codec"]
        for r in result["codecs"]
        if passes(r, result["reference_accuracy"], floor) and r["codec"] not in failed_served
    ]
    entry = {
        "fingerprint": fingerprint,
        "model": model,
        "kv_dtype": dtype,
        "measured_at": time.time(),
        "thresholds": {
            "top1_min": top1_min(floor),
            "top1_floor": floor["top1_agreement"] if floor else None,
            "kl_mean_max": KL_MEAN_MAX,
            "accuracy_drop_max": ACCURACY_DROP_MAX,
        },
        "reference_accuracy": result["reference_accuracy"],
        "codecs": result["codecs"],
        "floor": floor,
        "served": result.get("served"),  # through kvtier serve (--served), or None
        "passed": passed,
    }
    path = gate_dir() / f"{fingerprint}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=1))
    tmp.replace(path)
    return path


def load(fingerprint: str) -> dict[str, Any] | None:
    """The gate's record for a model, or None when it was never measured (or is unreadable)."""
    try:
        entry: dict[str, Any] = json.loads((gate_dir() / f"{fingerprint}.json").read_text())
    except (OSError, ValueError):
        return None
    return entry if entry.get("fingerprint") == fingerprint else None


def best_passed(fingerprint: str) -> str | None:
    """The smallest lossy codec the model passed; of those the same size, the one whose mean
    KL measured least (None: none passed, or never measured)."""
    entry = load(fingerprint)
    if not entry:
        return None
    kl = {r["codec"]: r.get("kl_mean", float("inf")) for r in entry.get("codecs", [])}
    passed = [c for c in BY_SIZE if c in set(entry["passed"])]
    return min(passed, key=lambda c: (_size(c), kl.get(c, 0.0)), default=None)


def served(fingerprint: str, codec: str) -> dict[str, Any] | None:
    """``codec``'s row of the served check in the model's record (``kvtier bench fidelity
    --served``: its answers through ``kvtier serve``), or None where it was not run."""
    entry = load(fingerprint) or {}
    return next((r for r in _served_rows(entry) if r["codec"] == codec), None)


def _served_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    served = result.get("served") or {}
    rows: list[dict[str, Any]] = served.get("rows", [])
    return rows


def _size(codec: str) -> int:
    """A chunk of one head stored with ``codec``: the forms' relative sizes."""
    return quant.stored_bytes(codec, (1, 2, 256, 1, 64))
