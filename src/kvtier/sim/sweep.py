"""``kvtier sim --sweep``: hit rate against capacity for every policy, with both bounds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.sim.bounds import belady_hits, infinite_hits
from kvtier.sim.engine import TierSpec, simulate
from kvtier.sim.trace import Request


@dataclass(frozen=True)
class SweepResult:
    capacities_blocks: list[int]
    block_bytes: int
    nodes: int
    routing: str
    series: dict[str, list[float]]  # policy (and "belady") -> block hit rate per capacity
    series_tokens: dict[str, list[float]]
    infinite_hit_rate_blocks: float
    infinite_hit_rate_tokens: float
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "capacities_blocks": self.capacities_blocks,
            "capacities_bytes": [c * self.block_bytes for c in self.capacities_blocks],
            "block_bytes": self.block_bytes,
            "nodes": self.nodes,
            "routing": self.routing,
            "hit_rate_blocks": self.series,
            "hit_rate_tokens": self.series_tokens,
            "infinite_hit_rate_blocks": self.infinite_hit_rate_blocks,
            "infinite_hit_rate_tokens": self.infinite_hit_rate_tokens,
            "elapsed_s": self.elapsed_s,
        }


def auto_capacities(requests: Sequence[Request], points: int = 8) -> list[int]:
    """From 1% to 100% of the distinct blocks, evenly on a log scale."""
    distinct = len({key for r in requests for key in r.hash_ids})
    low = max(1, distinct // 100)
    caps = {round(low * (distinct / low) ** (i / (points - 1))) for i in range(points)}
    return sorted(caps)


def sweep(
    requests: Sequence[Request],
    capacities: Sequence[int],
    policies: Sequence[str],
    *,
    block_bytes: int,
    nodes: int = 1,
    routing: str = "cache-aware",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SweepResult:
    """One node-local tier per node at each capacity (blocks per node), for every policy."""
    started = time.perf_counter()
    series: dict[str, list[float]] = {p: [] for p in [*policies, "belady"]}
    tokens: dict[str, list[float]] = {p: [] for p in [*policies, "belady"]}
    total_blocks = sum(len(r.hash_ids) for r in requests) or 1
    total_tokens = sum(r.input_length for r in requests) or 1
    for cap in capacities:
        for policy in policies:
            result = simulate(
                requests,
                [TierSpec("dram", cap)],
                block_bytes=block_bytes,
                policy=policy,
                nodes=nodes,
                routing=routing,
                seed=seed,
                bounds=False,
                progress=progress,
            )
            series[policy].append(result.hit_rate_blocks)
            tokens[policy].append(result.hit_rate_tokens)
        blocks, toks = belady_hits(requests, cap * nodes)
        series["belady"].append(blocks / total_blocks)
        tokens["belady"].append(toks / total_tokens)
    inf_blocks, inf_tokens = infinite_hits(requests)
    return SweepResult(
        list(capacities),
        block_bytes,
        nodes,
        routing,
        series,
        tokens,
        inf_blocks / total_blocks,
        inf_tokens / total_tokens,
        time.perf_counter() - started,
    )


def write_outputs(result: SweepResult, prefix: Path, title: str) -> tuple[Path, Path]:
    """``<prefix>.json`` and ``<prefix>.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path, png_path = prefix.with_suffix(".json"), prefix.with_suffix(".png")
    json_path.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rates in result.series.items():
        percent = [100 * r for r in rates]
        if name == "belady":
            ax.plot(result.capacities_blocks, percent, "k--", label="Belady (offline optimum)")
        else:
            ax.plot(result.capacities_blocks, percent, marker="o", label=name)
    ax.axhline(
        100 * result.infinite_hit_rate_blocks, linestyle=":", color="grey", label="infinite cache"
    )
    ax.set_xscale("log")
    per_node = " per node" if result.nodes > 1 else ""
    ax.set_xlabel(f"capacity{per_node} (512-token blocks of {result.block_bytes / 1e6:,.0f} MB)")
    ax.set_ylabel("block hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
