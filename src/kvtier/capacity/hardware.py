"""Hardware profiles for ``kvtier plan``: a node of GPUs and its memory and storage tiers.

Figures are public spec-sheet values (bytes and bytes per second; FLOP/s are dense bf16).
Rubin is "Rubin-class": the figures NVIDIA announced, to be replaced when the parts ship.
Every field can be overridden on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from kvtier.errors import ConfigError


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_bytes: float  # per GPU
    hbm_bw: float  # per GPU
    flops: float  # dense bf16 FLOP/s per GPU
    pcie_bw: float  # host <-> GPU, per GPU, one direction
    dram_bytes: float  # per node
    dram_bw: float  # per node
    ssd_bytes: float  # per node
    nvme_bw: float  # per node, all drives reading together
    network_bw: float  # per GPU, to the shared tier
    gpus_per_node: int = 8
    mfu: float = 0.5  # fraction of peak FLOP/s that a prefill reaches
    object_bw: float = 12.5e9  # per node, from the object store (G4: S3 over 100 Gb/s)


def _node(name: str, hbm_bytes: float, hbm_bw: float, flops: float, **changes: float) -> Hardware:
    """A GPU in a DGX/HGX-like node of 8 (PCIe Gen5, 2 TB of DDR5, 8 NVMe drives, 400 Gb/s)."""
    base = Hardware(
        name,
        hbm_bytes,
        hbm_bw,
        flops,
        pcie_bw=64e9,
        dram_bytes=2e12,
        dram_bw=600e9,
        ssd_bytes=30.72e12,
        nvme_bw=50e9,
        network_bw=50e9,
    )
    return replace(base, **changes)  # type: ignore[arg-type]  # every field here is a float


PROFILES: dict[str, Hardware] = {
    h.name.lower(): h
    for h in (
        _node("H100", 80e9, 3.35e12, 989e12),
        _node("H200", 141e9, 4.8e12, 989e12),
        _node("B200", 180e9, 8e12, 2.25e15, dram_bytes=4e12),
        _node(  # PCIe Gen6, 800 Gb/s per GPU
            "Rubin",
            288e9,
            13e12,
            4e15,
            pcie_bw=128e9,
            dram_bytes=4e12,
            dram_bw=1.2e12,
            ssd_bytes=61.44e12,
            nvme_bw=100e9,
            network_bw=100e9,
            object_bw=25e9,
        ),
    )
}

FIELDS = [f.name for f in fields(Hardware) if f.name != "name"]


def load_hardware(name: str, overrides: dict[str, float] | None = None) -> Hardware:
    """A profile by name (any case), with fields replaced by ``overrides``."""
    profile = PROFILES.get(name.lower())
    if profile is None:
        raise ConfigError(
            f"hardware {name!r}: allowed {', '.join(h.name for h in PROFILES.values())}"
        )
    overrides = overrides or {}
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown hardware field(s) {sorted(unknown)}; allowed: {FIELDS}")
    for key, value in overrides.items():
        if value <= 0:
            raise ConfigError(f"hardware {key}: must be positive, got {value}")
    if "gpus_per_node" in overrides:
        overrides = {**overrides, "gpus_per_node": int(overrides["gpus_per_node"])}
    if overrides.get("mfu", 0.5) > 1:
        raise ConfigError(f"hardware mfu: a fraction of peak, at most 1, got {overrides['mfu']}")
    return replace(profile, **overrides)  # type: ignore[arg-type]  # checked above
