"""The console's memory: the last scrapes of every engine (and the router's state), and what
the page draws from them.

Rates come from two consecutive scrapes of the same engine: hit rate per tier = tokens loaded
from the tier / prompt tokens looked up in the interval (vLLM's own prefix cache counts as
the tier ``vllm prefix``), bytes/s per tier and direction. A counter that went down (an engine
restarted) counts from zero. Totals, occupancy, health and the TTFT distribution come from the
latest scrape of each engine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvtier.console.scrape import Scrape

POINTS = 300  # 10 minutes at one scrape every 2 s
PREFIX = "vllm prefix"  # vLLM's own prefix cache, charted as a tier beside kvtier's
COUNTERS = (
    "lookups",
    "requested_tokens",
    "vllm_prefix_tokens",
    "hit_tokens",
    "recomputed_tokens",
    "prefill_seconds_saved",
)
TIER_FIELDS = ("up", "used_bytes", "capacity_bytes", "chunks", "tokens")
TIER_COUNTS = (
    "loaded_tokens",
    "bytes_read",
    "bytes_written",
    "tokens_written",
    "raw_bytes_written",
    "evictions",
    "corruptions",
    "errors",
    "writes_dropped",
)
TENANT_COUNTS = ("requested_tokens", "vllm_prefix_tokens", "hit_tokens", "loaded_tokens")
TENANT_TIER = {  # the field each tenant's tier row takes from a series
    "used_bytes": "kvtier:tenant_tier_used_bytes",
    "share_bytes": "kvtier:tenant_tier_share_bytes",
    "evictions": "kvtier:tenant_tier_evictions_total",
}
TTFT = "vllm:time_to_first_token_seconds"
# The series the console reads; the rest of an engine's page is not parsed.
SERIES = ("kvtier:", "vllm:num_requests_running", "vllm:num_requests_waiting", TTFT)


@dataclass
class Point:
    """One round of scrapes: each engine's page (None where the scrape failed), at wall time
    ``t`` (shown) and monotonic time ``mono`` (intervals: a clock step does not bend them)."""

    t: float
    engines: dict[str, Scrape | None]
    errors: dict[str, str] = field(default_factory=dict)
    mono: float | None = None


def _grew(now: float | None, before: float | None) -> float:
    """A counter's growth: from zero when it is new or went down (its engine restarted)."""
    if now is None:
        return 0.0
    if before is None or now < before:
        return now
    return now - before


class History:
    def __init__(self, points: int = POINTS):
        self.points: deque[Point] = deque(maxlen=points)

    def add(self, point: Point) -> None:
        self.points.append(point)

    def clear(self) -> None:
        self.points.clear()

    def view(self, router: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything the page shows, as plain JSON."""
        latest = self.points[-1] if self.points else Point(0.0, {})
        return {
            "t": [p.t for p in self.points][1:],
            **self._series(),
            "totals": _totals(latest),
            "engines": [_engine(url, scrape, latest) for url, scrape in latest.engines.items()],
            "tiers": list(_tiers(latest)),
            "tenants": _tenants(latest),
            "ttft": _ttft(latest),
            "routing": _routing(router),
            "updated": latest.t,
        }

    def _series(self) -> dict[str, Any]:
        hit: dict[str, list[float | None]] = {}
        moved: dict[str, list[float]] = {}
        load: dict[str, list[float | None]] = {}
        saved: list[float] = []
        points = list(self.points)
        n = len(points) - 1

        def column(table: dict[str, list[Any]], name: str, fill: Any) -> list[Any]:
            return table.setdefault(name, [fill] * n)

        for i in range(n):
            before, now = points[i], points[i + 1]
            if now.mono is not None and before.mono is not None:
                dt = max(now.mono - before.mono, 1e-3)
            else:
                dt = max(now.t - before.t, 1e-3)
            requested, prefix = 0.0, 0.0
            loaded: dict[str, float] = {}
            for url, scrape in now.engines.items():
                old = before.engines.get(url)
                if scrape is None:
                    continue
                running = scrape.total("vllm:num_requests_running")
                waiting = scrape.total("vllm:num_requests_waiting")
                column(load, f"{url} running", None)[i] = running
                column(load, f"{url} waiting", None)[i] = waiting
                if old is None:
                    continue
                requested += _grew(
                    scrape.total("kvtier:requested_tokens_total"),
                    old.total("kvtier:requested_tokens_total"),
                )
                prefix += _grew(
                    scrape.total("kvtier:vllm_prefix_tokens_total"),
                    old.total("kvtier:vllm_prefix_tokens_total"),
                )
                for what, label in (("bytes_read", "read"), ("bytes_written", "written")):
                    olds = old.by(f"kvtier:tier_{what}_total", "tier")
                    for tier, v in scrape.by(f"kvtier:tier_{what}_total", "tier").items():
                        column(moved, f"{tier} {label}", 0.0)[i] += _grew(v, olds.get(tier)) / dt
                olds = old.by("kvtier:tier_loaded_tokens_total", "tier")
                for tier, v in scrape.by("kvtier:tier_loaded_tokens_total", "tier").items():
                    loaded[tier] = loaded.get(tier, 0.0) + _grew(v, olds.get(tier))
            column(hit, PREFIX, None)
            for tier, tokens in [(PREFIX, prefix), *loaded.items()]:
                column(hit, tier, None)[i] = tokens / requested if requested else None
            saved.append(_totals(now)["prefill_seconds_saved"])
        return {"hit_rate": hit, "bytes_per_s": moved, "load": load, "saved_s": saved}


def _engine(url: str, scrape: Scrape | None, point: Point) -> dict[str, Any]:
    return {
        "url": url,
        "up": scrape is not None,
        "error": point.errors.get(url),
        "running": scrape.total("vllm:num_requests_running") if scrape else None,
        "waiting": scrape.total("vllm:num_requests_waiting") if scrape else None,
    }


def _totals(point: Point) -> dict[str, Any]:
    out: dict[str, Any] = {name: 0.0 for name in COUNTERS}
    loaded: dict[str, float] = {}
    for scrape in point.engines.values():
        if scrape is None:
            continue
        for name in COUNTERS:
            out[name] += scrape.total(f"kvtier:{name}_total") or 0.0
        for tier, v in scrape.by("kvtier:tier_loaded_tokens_total", "tier").items():
            loaded[tier] = loaded.get(tier, 0.0) + v
    out["loaded_tokens"] = loaded
    asked = out["requested_tokens"]
    out["hit_rate"] = (sum(loaded.values()) + out["vllm_prefix_tokens"]) / asked if asked else None
    return out


def _tiers(point: Point) -> Iterator[dict[str, Any]]:
    """Occupancy, capacity, health and counts of each tier of each engine."""
    for url, scrape in point.engines.items():
        if scrape is None:
            continue
        ups = scrape.lowest("kvtier:tier_up", "tier")
        columns = {f: scrape.by(f"kvtier:tier_{f}", "tier") for f in TIER_FIELDS[1:]}
        counts = {f: scrape.by(f"kvtier:tier_{f}_total", "tier") for f in TIER_COUNTS}
        for tier in sorted(set(ups).union(*columns.values())):
            row: dict[str, Any] = {"engine": url, "tier": tier, "up": ups.get(tier)}
            row.update({f: columns[f].get(tier) for f in TIER_FIELDS[1:]})
            row.update({f: counts[f].get(tier, 0.0) for f in TIER_COUNTS})
            yield row


def _tenants(point: Point) -> list[dict[str, Any]]:
    """Per tenant (with ``--tenants``), over all engines: its prompt tokens looked up, the
    part cached (vLLM's prefix cache and kvtier's loads), and its part of each tier that
    divides its room among tenants (bytes held, its quota or share, evictions)."""
    rows: dict[str, dict[str, Any]] = {}

    def row(tenant: str) -> dict[str, Any]:
        return rows.setdefault(
            tenant, {"tenant": tenant, **{n: 0.0 for n in TENANT_COUNTS}, "tiers": {}}
        )

    for scrape in point.engines.values():
        if scrape is None:
            continue
        for name in TENANT_COUNTS:
            for tenant, v in scrape.by(f"kvtier:tenant_{name}_total", "tenant").items():
                row(tenant)[name] += v
        for field_name, series in TENANT_TIER.items():
            for (tenant, tier), v in scrape.by_pair(series, "tenant", "tier").items():
                tiers = row(tenant)["tiers"]
                part = tiers.setdefault(tier, {f: 0.0 for f in TENANT_TIER})
                part[field_name] += v
    out = []
    for tenant in sorted(rows):
        r = rows[tenant]
        asked = r["requested_tokens"]
        cached = r["loaded_tokens"] + r["vllm_prefix_tokens"]
        r["hit_rate"] = cached / asked if asked else None
        out.append(r)
    return out


def _ttft(point: Point) -> dict[str, Any]:
    """vLLM's time-to-first-token histogram over all engines, as counts per bucket."""
    cumulative: dict[str, float] = {}
    count = total = 0.0
    for scrape in point.engines.values():
        if scrape is None:
            continue
        for le, v in scrape.by(f"{TTFT}_bucket", "le").items():
            cumulative[le] = cumulative.get(le, 0.0) + v
        count += scrape.total(f"{TTFT}_count") or 0.0
        total += scrape.total(f"{TTFT}_sum") or 0.0
    bounds = sorted(cumulative, key=float)
    counts, below = [], 0.0
    for le in bounds:
        counts.append(cumulative[le] - below)
        below = cumulative[le]
    upper = [None if b == "+Inf" else float(b) for b in bounds]  # JSON has no infinity
    return {
        "le": upper,
        "counts": counts,
        "count": count,
        "mean_s": total / count if count else None,
    }


def _routing(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    keep = (
        "policy",
        "reasons",
        "decisions",
        "retries",
        "recent",
        "reuse",
        "overhead_ms_p50",
        "overhead_ms_p99",
    )
    out = {k: state.get(k) for k in keep}
    out["engines"] = [
        {k: e.get(k) for k in ("url", "role", "healthy", "queued_tokens", "in_flight", "routed")}
        for e in state.get("engines", [])
    ]
    return out
