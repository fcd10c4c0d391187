"""``kvtier sim``'s work: the requests (a trace or a synthetic workload), the tiers, one
simulation or a capacity sweep, and what it prints (the arguments: :mod:`kvtier.cli.sim_cmd`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError


def _requests(args: argparse.Namespace) -> tuple[list[Any], str, int]:
    from kvtier.sim.synthetic import Workload, generate
    from kvtier.sim.trace import read_trace

    if args.workload and args.trace:
        raise ConfigError("give a trace or --workload, not both")
    if args.workload:
        workload = Workload(
            kind=args.workload,
            users=args.users,
            turns=args.turns,
            system_tokens=args.system_tokens,
            docs=args.docs,
            doc_tokens=args.doc_tokens,
            rag_requests=args.questions,
            seed=args.seed,
        )
        return generate(workload), f"synthetic {args.workload} workload", 0
    if not args.trace:
        raise ConfigError("kvtier sim needs a trace file or --workload (see kvtier sim --help)")
    trace = read_trace(args.trace, skip_bad=args.skip_bad)
    if not trace.requests:
        raise ConfigError(f"{args.trace}: no requests")
    return trace.requests, Path(args.trace).name, trace.skipped


def _tiers(args: argparse.Namespace, block_bytes: int, hw: Any, stored: float) -> list[Any]:
    """The tiers from the sizes given (or the node profile's); ``stored``: bytes the tiers
    below DRAM store per byte of raw KV (their codec)."""
    from kvtier.capacity.plan import links
    from kvtier.config import parse_size
    from kvtier.sim.engine import TierSpec

    bandwidth = {name: bw for name, (bw, _) in links(hw).items()}
    sizes = {"dram": args.dram, "ssd": args.ssd, "shared": args.shared, "object": args.object}
    if args.blocks is not None:
        if any(sizes.values()):
            raise ConfigError(
                "--blocks is a single tier: leave out --dram, --ssd, --shared and --object"
            )
        return [TierSpec("dram", args.blocks, bandwidth=bandwidth["dram"])]
    if not any(sizes.values()):
        sizes = {"dram": str(int(hw.dram_bytes)), "ssd": str(int(hw.ssd_bytes))}
    tiers = []
    for name, text in sizes.items():
        if text:
            ratio = 1.0 if name == "dram" else stored  # DRAM holds raw KV
            block = max(1, int(block_bytes * ratio))
            n = parse_size(text, f"--{name}") // block
            if n < 1:
                raise ConfigError(
                    f"--{name} {text} holds no 512-token block ({block:,} bytes each)"
                )
            shared, bw = name in ("shared", "object"), bandwidth[name]  # pod-wide
            tiers.append(TierSpec(name, n, shared=shared, bandwidth=bw, stored=ratio))
    return tiers


def _capacities(text: str, requests: list[Any], block_bytes: int) -> list[int]:
    from kvtier.config import parse_size
    from kvtier.sim.sweep import auto_capacities

    if text == "auto":
        return auto_capacities(requests)
    caps = []
    for item in text.split(","):
        item = item.strip()
        n = int(item) if item.isdigit() else parse_size(item, "--sweep") // block_bytes
        if n < 1:
            raise ConfigError(f"--sweep {item}: less than one block ({block_bytes:,} bytes)")
        caps.append(n)
    return sorted(set(caps))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvtier.capacity.hardware import load_hardware
    from kvtier.capacity.models import load_model
    from kvtier.capacity.plan import codec_bytes_per_token, recompute_s
    from kvtier.policy.eviction import POLICY_NAMES
    from kvtier.sim.engine import CostModel, TierSpec, simulate, validate
    from kvtier.sim.sweep import sweep, write_outputs
    from kvtier.sim.trace import BLOCK_TOKENS

    model = load_model(args.model)
    hw = load_hardware(args.hardware)
    per_token = model.kv_bytes_per_token(args.dtype)
    block_bytes = per_token * BLOCK_TOKENS
    stored = 1.0  # the tiers below DRAM: bytes stored per byte of raw KV
    if args.codec:
        stored = codec_bytes_per_token(model, args.codec) / per_token
    requests, source, skipped = _requests(args)
    default = ",".join(POLICY_NAMES) if args.sweep else "lru"
    policies = [p.strip() for p in (args.policy or default).split(",") if p.strip()]

    if args.sweep:
        if args.dram or args.ssd or args.shared or args.object or args.blocks is not None:
            raise ConfigError(
                "--sweep varies the capacity of one DRAM tier per node itself: leave out"
                " --dram, --ssd, --shared, --object and --blocks"
            )
        caps = _capacities(args.sweep, requests, block_bytes)
        for policy in policies:
            validate([TierSpec("dram", caps[0])], policy, args.nodes, args.routing)
        runs = len(caps) * len(policies) * len(requests)
        with tqdm(total=runs, unit="req", desc="kvtier sim --sweep", disable=None) as bar:
            swept = sweep(
                requests,
                caps,
                policies,
                block_bytes=block_bytes,
                nodes=args.nodes,
                routing=args.routing,
                seed=args.seed,
                progress=bar.update,
            )
        title = f"{source}: {model.name} {args.dtype}, {args.nodes} node(s)"
        json_path, png_path = write_outputs(swept, Path(args.out), title)
        out = {**swept.as_dict(), "json": str(json_path), "png": str(png_path)}
        if args.json:
            print(json.dumps(out))
        else:
            print(_render_sweep(swept, source, json_path, png_path))
        return 0

    if len(policies) != 1:
        raise ConfigError("--policy takes one name outside --sweep")
    tiers = _tiers(args, block_bytes, hw, stored)
    cost = CostModel(per_token, lambda n: recompute_s(model, n, hw))
    with tqdm(total=len(requests), unit="req", desc="kvtier sim", disable=None) as bar:
        result = simulate(
            requests,
            tiers,
            block_bytes=block_bytes,
            policy=policies[0],
            nodes=args.nodes,
            routing=args.routing,
            seed=args.seed,
            cost=cost,
            bounds=not args.no_bounds,
            progress=bar.update,
        )
    out = {
        "source": source,
        "model": model.name,
        "kv_dtype": args.dtype,
        "codec": args.codec,
        "stored_ratio": stored,
        "hardware": hw.name,
        "skipped_lines": skipped,
        **result.as_dict(),
    }
    print(json.dumps(out) if args.json else _render(out))
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _decimal(n: float) -> str:
    """``2.0 TB``: the decimal half of :func:`human_bytes`, for narrow table cells."""
    from kvtier.capacity.plan import human_bytes

    return human_bytes(n).split(" (")[0]


def _render(r: dict[str, Any]) -> str:
    from kvtier.capacity.plan import human_bytes

    block = r["block_bytes"]
    lines = [
        f"{r['source']}: {r['requests']:,} requests, {r['blocks']:,} blocks, {r['tokens']:,}"
        f" prompt tokens"
        + (f" ({r['skipped_lines']} bad lines skipped)" if r["skipped_lines"] else ""),
        f"{r['model']} KV in {r['kv_dtype']}: {human_bytes(block)} per 512-token block"
        + (
            f" ({r['codec']} below DRAM: {r['stored_ratio']:.3f}x the bytes)"
            if r.get("codec")
            else ""
        )
        + ";"
        f" policy {r['policy']}, {r['nodes']} node(s)"
        + (f", {r['routing']} routing" if r["nodes"] > 1 else ""),
        "",
        f"  {'tier':<8}{'capacity':>30}{'hits (blocks)':>15}{'(tokens)':>10}"
        f"{'read':>12}{'written':>12}{'evictions':>11}",
    ]
    for t in r["tiers"]:
        where = "pod" if t["shared"] else "node"
        ratio = 1.0 if t["name"] == "dram" else r.get("stored_ratio") or 1.0  # its codec
        cap = f"{_decimal(t['capacity_blocks'] * block * ratio)}/{where}"
        cap += f" ({t['capacity_blocks']:,})"
        lines.append(
            f"  {t['name']:<8}{cap:>30}{_pct(t['hit_rate_blocks']):>15}"
            f"{_pct(t['hit_rate_tokens']):>10}"
            f"{_decimal(t['read_bytes']):>12}"
            f"{_decimal(t['written_bytes']):>12}{t['evictions']:>11,}"
        )
    lines += [
        f"  {'all':<8}{'':>30}{_pct(r['hit_rate_blocks']):>15}{_pct(r['hit_rate_tokens']):>10}",
        "",
        f"  bounds: Belady {_pct(r['belady_hit_rate_blocks'])} of blocks at"
        f" {r['belady_capacity_blocks']:,} blocks, infinite cache"
        f" {_pct(r['infinite_hit_rate_blocks'])}",
        f"  prefill tokens saved: {r['prefill_tokens_saved']:,} of {r['tokens']:,}",
    ]
    if r["ttft_s"]:
        t, c = r["ttft_s"], r["ttft_cold_s"]
        lines.append(
            f"  estimated TTFT on {r['hardware']} (load + recompute, no queueing):"
            f" p50 {t['p50']:.3f} s, p90 {t['p90']:.3f} s, p99 {t['p99']:.3f} s"
            f"  (no cache: {c['p50']:.3f} / {c['p90']:.3f} / {c['p99']:.3f} s)"
        )
        q = r["ttft_queued_s"]
        lines.append(
            f"  with the wait behind earlier prefills on the same node (one at a time):"
            f" p50 {q['p50']:.3f} s, p90 {q['p90']:.3f} s, p99 {q['p99']:.3f} s"
        )
    lines.append(f"  simulated in {r['elapsed_s']:.1f} s")
    return "\n".join(lines)


def _render_sweep(result: Any, source: str, json_path: Path, png_path: Path) -> str:
    names = list(result.series)
    lines = [
        f"{source}: block hit rate by capacity (blocks per node), {result.nodes} node(s)",
        "  " + f"{'capacity':>10}" + "".join(f"{n:>10}" for n in names),
    ]
    for i, cap in enumerate(result.capacities_blocks):
        lines.append(
            "  " + f"{cap:>10,}" + "".join(f"{_pct(result.series[n][i]):>10}" for n in names)
        )
    lines += [
        f"  infinite cache: {_pct(result.infinite_hit_rate_blocks)}",
        f"  wrote {png_path} and {json_path} in {result.elapsed_s:.1f} s",
    ]
    return "\n".join(lines)
