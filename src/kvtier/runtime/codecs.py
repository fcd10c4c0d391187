"""``kvtier serve --codec``: each tier's stored form, with the quality gate for lossy codecs.

``--codec TIER=NAME`` (repeatable) sets a tier's codec (``none``, ``zstd``, ``lz4``, ``bf16``,
``int8``, ``int8c``, ``fp8``, ``int4``, ``int4r``, ``k8v4``); ``--codec auto`` gives every
tier below DRAM the smallest lossy codec the model passed (:mod:`kvtier.gate`), DRAM staying
raw (its hits are copied straight from the tier's memory); ``--codec none`` keeps every tier
raw.
Without ``--codec``, the tiers below DRAM that the configuration leaves raw get what ``auto``
gives (raw until the model has passed the gate). A lossy codec the model has not passed is
refused unless ``--force-codec``, which warns with what was measured.
"""

from __future__ import annotations

import dataclasses

from kvtier import gate, quant
from kvtier.config import COMPRESSIONS, MemoryTierConfig, StoreConfig
from kvtier.errors import ConfigError


def apply_codecs(
    config: StoreConfig, specs: list[str], fingerprint: str | None, force: bool
) -> tuple[StoreConfig, list[str]]:
    """``config`` with the tiers' codecs from ``specs``, and lines to print (choices and
    warnings). ``fingerprint``: the model's (None: not known yet, the gate is not checked)."""
    tiers = list(config.tiers)
    names = [t.name for t in tiers]
    notes: list[str] = []
    default = not specs  # auto, for the tiers the configuration leaves raw
    for spec in specs or ["auto"]:
        said = "no --codec" if default else f"--codec {spec}"
        if spec == "none":
            tiers = [dataclasses.replace(t, compression="none") for t in tiers]
            continue
        if spec == "auto":
            best = gate.best_passed(fingerprint) if fingerprint else None
            if fingerprint and best is None and len(tiers) > 1:
                notes.append(
                    f"{said}: no lossy codec has passed the quality gate for this model;"
                    " lower tiers store raw KV (run `kvtier bench fidelity --gate`)"
                )
            for i, tier in enumerate(tiers):
                if isinstance(tier, MemoryTierConfig) or not best:
                    continue
                if default and tier.compression != "none":
                    continue  # the configuration chose it
                tiers[i] = dataclasses.replace(tier, compression=best)
                notes.append(
                    f"{said}: {tier.name} stores {best}, the smallest codec that passed the"
                    " quality gate for this model (--codec none: raw)"
                )
            if fingerprint and best and len(tiers) > 1 and gate.served(fingerprint, best) is None:
                notes.append(
                    f"{said}: {best} was measured on the model, not yet through kvtier serve"
                    " on this host (`kvtier bench fidelity --gate --served` checks both)"
                )
            continue
        tier_name, sep, codec = spec.partition("=")
        if not sep or tier_name not in names:
            raise ConfigError(
                f"--codec {spec}: expected TIER=CODEC with TIER one of {', '.join(names)}"
                " (or auto, or none)"
            )
        if codec not in COMPRESSIONS:
            raise ConfigError(f"--codec {spec}: codecs are {', '.join(COMPRESSIONS)}")
        if codec in quant.LOSSY and fingerprint:
            notes += _check_gate(spec, codec, fingerprint, force)
        i = names.index(tier_name)
        tiers[i] = dataclasses.replace(tiers[i], compression=codec)
    return dataclasses.replace(config, tiers=tuple(tiers)), notes


def _check_gate(spec: str, codec: str, fingerprint: str, force: bool) -> list[str]:
    entry = gate.load(fingerprint) or {"passed": [], "codecs": []}
    if codec in entry["passed"]:
        return []
    row = next((r for r in entry["codecs"] if r["codec"] == codec), None)
    measured = "never measured for this model"
    if row is not None:
        measured = (
            f"measured top-1 {row['top1_agreement']:.1%}, mean KL {row['kl_mean']:.4f} nats,"
            f" accuracy {row['accuracy']:.1%} against {entry['reference_accuracy']:.1%}"
        )
    if force:
        return [f"WARNING: --codec {spec} forced: {codec} has not passed the gate ({measured})"]
    raise ConfigError(
        f"--codec {spec}: {codec} has not passed the quality gate for this model ({measured});"
        " run `kvtier bench fidelity --gate`, or give --force-codec to store it anyway"
    )
