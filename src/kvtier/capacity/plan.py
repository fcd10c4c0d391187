"""``kvtier plan``'s arithmetic: the KV footprint of a workload and, per tier, the time to load
a context compared with the time to recompute it.

The model is served by one node (``gpus_per_node`` GPUs, tensor parallel), so a context's KV
is spread over the node's GPUs and every GPU's link works at once:

- HBM:    reading it once at HBM bandwidth (the floor for any tier);
- DRAM:   host memory -> GPUs, bound by the slower of DRAM and the PCIe links;
- SSD:    local NVMe -> GPUs, bound by the drives or the PCIe links;
- shared: a pod-wide tier over the network (NVIDIA's G3.5), bound by the NICs or PCIe;
- object: object storage (G4, S3), bound by the node's share of the store's throughput.

Recompute: the prefill FLOPs of the context at ``mfu`` of the node's peak.

With a codec (``--codec int8``: :mod:`kvtier.quant`, scales included) the tiers below HBM hold
the stored form: more users per tier, fewer bytes per load (decoding not counted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvtier.capacity.hardware import Hardware
from kvtier.capacity.models import ModelSpec
from kvtier.errors import ConfigError


@dataclass(frozen=True)
class TierEstimate:
    tier: str
    bandwidth_bytes_s: float
    capacity_bytes: float | None  # per node; None: pod-wide, sized separately
    load_s: float  # one user's context
    beats_recompute: bool
    users_held: int | None = None  # whole contexts the tier holds per node (None: pod-wide)
    users_held_codec: int | None = None  # the same, stored with the codec


@dataclass(frozen=True)
class Plan:
    model: str
    kv_dtype: str
    hardware: str
    context_tokens: int
    users: int
    bytes_per_token: int
    bytes_per_user: int
    total_bytes: int
    hbm_gpus: int  # GPUs whose whole HBM the users' KV alone would fill
    recompute_s: float
    tiers: list[TierEstimate]
    slowest_tier_beating_recompute: str | None
    codec: str | None = None
    codec_bytes_per_token: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def links(hw: Hardware) -> dict[str, tuple[float, float | None]]:
    """Per tier: (bandwidth into the node's GPUs in bytes/s, capacity per node or None)."""
    gpus = hw.gpus_per_node
    pcie = hw.pcie_bw * gpus
    return {
        "hbm": (hw.hbm_bw * gpus, hw.hbm_bytes * gpus),
        "dram": (min(hw.dram_bw, pcie), hw.dram_bytes),
        "ssd": (min(hw.nvme_bw, pcie), hw.ssd_bytes),
        "shared": (min(hw.network_bw * gpus, pcie), None),
        "object": (min(hw.object_bw, pcie), None),
    }


def recompute_s(model: ModelSpec, tokens: int, hw: Hardware) -> float:
    """Seconds for the node to compute the KV of ``tokens`` prompt tokens from scratch."""
    return model.prefill_flops(tokens) / (hw.flops * hw.gpus_per_node * hw.mfu)


def codec_bytes_per_token(model: ModelSpec, codec: str) -> int:
    """Bytes per token of the model's KV stored with ``codec``, scales included."""
    from kvtier import quant

    if codec not in quant.LOSSY:
        raise ConfigError(f"codec {codec!r}: allowed {', '.join(quant.LOSSY)}")
    dim = model.mla_latent or model.head_dim  # what one scale or group covers
    per_value = quant.stored_bytes(codec, (1, 2, 256, 1, dim)) / (2 * 256 * dim)
    return int(model.kv_elements_per_token() * per_value)


def make_plan(
    model: ModelSpec,
    kv_dtype: str,
    context_tokens: int,
    users: int,
    hw: Hardware,
    codec: str | None = None,
) -> Plan:
    if context_tokens <= 0 or users <= 0:
        raise ConfigError(f"context and users must be positive, got {context_tokens}, {users}")
    per_token = model.kv_bytes_per_token(kv_dtype)
    per_user = per_token * context_tokens
    total = per_user * users
    recompute = recompute_s(model, context_tokens, hw)
    coded = codec_bytes_per_token(model, codec) if codec else None
    tiers = []
    for name, (bw, cap) in links(hw).items():
        stored = per_user if coded is None or name == "hbm" else coded * context_tokens
        load = stored / bw
        held = int(cap // per_user) if cap else None
        held_codec = int(cap // (coded * context_tokens)) if cap and coded else None
        if name == "hbm":
            held_codec = held if coded else None  # the engine computes on raw KV
        tiers.append(TierEstimate(name, bw, cap, load, load < recompute, held, held_codec))
    beating = sorted((t for t in tiers if t.beats_recompute), key=lambda t: -t.bandwidth_bytes_s)
    return Plan(
        model=model.name,
        kv_dtype=kv_dtype,
        hardware=hw.name,
        context_tokens=context_tokens,
        users=users,
        bytes_per_token=per_token,
        bytes_per_user=per_user,
        total_bytes=total,
        hbm_gpus=-(-total // int(hw.hbm_bytes)),
        recompute_s=recompute,
        tiers=tiers,
        slowest_tier_beating_recompute=beating[-1].tier if beating else None,
        codec=codec,
        codec_bytes_per_token=coded,
    )


def human_bytes(n: float) -> str:
    """``51.6 GB (48.1 GiB)``: decimal and binary, as vendors and operating systems count."""
    dec = next(
        (
            f"{n / f:.1f} {u}"
            for f, u in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"))
            if n >= f
        ),
        f"{n:.0f} B",
    )
    binary = next(
        (
            f"{n / f:.1f} {u}"
            for f, u in ((2**50, "PiB"), (2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"))
            if n >= f
        ),
        f"{n:.0f} B",
    )
    return f"{dec} ({binary})"


def render(plan: Plan) -> str:
    lines = [
        f"{plan.model}, KV in {plan.kv_dtype}, on {plan.hardware} nodes",
        f"  KV per token:        {plan.bytes_per_token:,} bytes",
        f"  per user ({plan.context_tokens:,} tokens): {human_bytes(plan.bytes_per_user)}",
        f"  {plan.users:,} user{'s' * (plan.users != 1)}: {human_bytes(plan.total_bytes)},"
        f" the whole HBM of {plan.hbm_gpus:,} GPU{'s' * (plan.hbm_gpus != 1)}",
        f"  recompute one context: {_secs(plan.recompute_s)}",
    ]
    if plan.codec and plan.codec_bytes_per_token:
        share = plan.codec_bytes_per_token / plan.bytes_per_token
        lines.append(
            f"  below HBM, stored as {plan.codec}: {plan.codec_bytes_per_token:,} bytes per token"
            f" ({share:.2f}x; decoding not counted in load times)"
        )
    users_col = f"{'contexts held':>20}" if plan.codec else f"{'contexts held':>14}"
    lines += [
        "",
        f"  {'tier':<8}{'bandwidth':>14}{'capacity/node':>24}{users_col}{'load one context':>18}"
        "  vs recompute",
    ]
    for t in plan.tiers:
        cap = human_bytes(t.capacity_bytes) if t.capacity_bytes else "pod-wide"
        ratio = plan.recompute_s / t.load_s
        verdict = f"{ratio:,.1f}x faster" if t.beats_recompute else f"{1 / ratio:,.1f}x slower"
        held = "-" if t.users_held is None else f"{t.users_held:,}"
        if plan.codec:
            coded = "-" if t.users_held_codec is None else f"{t.users_held_codec:,}"
            held = f"{held} -> {coded}"
        lines.append(
            f"  {t.tier:<8}{t.bandwidth_bytes_s / 1e9:>10.0f} GB/s{cap:>24}"
            f"{held:>{len(users_col)}}{_secs(t.load_s):>18}  {verdict}"
        )
    best = plan.slowest_tier_beating_recompute
    lines.append("")
    lines.append(
        f"  slowest tier that still beats recomputing: {best}"
        if best
        else "  no tier beats recomputing this context"
    )
    return "\n".join(lines)


def _secs(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"
