"""kvtier's metrics on vLLM's own ``/metrics``, through vLLM's connector statistics API.

Each step, vLLM asks the connector for its statistics (:class:`KvtierStats`): the scheduler side
counts requests (lookups, requested and hit tokens, tokens loaded per tier, recomputed tokens,
load times from the worker's reports, prefill seconds saved); the worker side counts what its
store did per tier (bytes read and written, evictions, corruptions, errors, dropped writes) and,
every few seconds, how full each tier is and whether it is up. vLLM aggregates them and hands
them to the API server's Prometheus logger, which :class:`KvtierPromMetrics` turns into
``kvtier:*`` series (label ``tier``), next to vLLM's ``vllm:*``.

With a tenants file (``kvtier serve --tenants``), the scheduler side also counts tokens per
tenant id (the head of each request's derived salt), and the API server names the ids from
the same file (label ``tenant``). The per-request bookkeeping is
:mod:`kvtier.integrations.vllm.accounts`'s.

Prefill seconds saved = tokens loaded / the prefill rate this engine measures: tokens scheduled
per second of wall time over recent steps that computed at least :data:`RATE_MIN_TOKENS`
(kept in the disk tier's directory across restarts).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvtier.config import config_from_dict
from kvtier.errors import ConfigError
from kvtier.integrations.tenant_gate import TENANTS_ENV
from kvtier.integrations.vllm.context import ConnectorOptions
from kvtier.stats import StoreStats
from kvtier.tenants import load_tenants

TIER_COUNTERS = (
    "loaded_tokens",
    "bytes_read",
    "bytes_written",
    "tokens_written",
    "raw_bytes_written",
    "evictions",
    "corruptions",
    "errors",
    "writes_dropped",
    "writes_existing",
)
TIER_GAUGES = ("up", "used_bytes", "chunks", "capacity_bytes", "tokens")
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_STEPS = 64  # steps the prefill rate is measured over
RATE_MIN_TOKENS = 64  # fewer: a step of decodes (a hits-first prefill step is ~100-300)
STATES_EVERY_S = 2.0  # how often the worker reports its tiers' occupancy and health
LIVE: list[KvtierPromMetrics] = []  # this API server's series (refreshed on GET /metrics)
RATE_FILE = "prefill_rate.json"  # in the disk tier's directory (its scans skip it)
SAVE_EVERY_S = 1.0  # the rate's file is rewritten at most this often


@dataclass
class KvtierStats(KVConnectorStats):
    """One interval's counts: ``{"counters": {...}, "tiers": {tier: {...}}, "load_s": [...],
    "save_s": [...]}``.

    Counters and per-tier counters add up when intervals (or workers) aggregate; per-tier
    gauges keep the latest value.
    """

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = merge(self.data, other.data)
        return KvtierStats(merged)

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.data.get("counters", {}))
        for tier, values in self.data.get("tiers", {}).items():
            for name in ("loaded_tokens", "bytes_read"):
                if values.get(name):
                    out[f"{name}[{tier}]"] = values[name]
        return out

    def is_empty(self) -> bool:
        return not self.data


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` and ``b`` (payloads of :class:`KvtierStats`) as one."""
    out: dict[str, Any] = {"counters": dict(a.get("counters", {})), "tiers": {}}
    for times in ("load_s", "save_s"):
        out[times] = [*a.get(times, ()), *b.get(times, ())]
    for name, value in b.get("counters", {}).items():
        out["counters"][name] = out["counters"].get(name, 0) + value
    for tiers in (a.get("tiers", {}), b.get("tiers", {})):
        for tier, values in tiers.items():
            mine = out["tiers"].setdefault(tier, {})
            for name, value in values.items():
                if name in TIER_GAUGES:
                    mine[name] = value
                else:
                    mine[name] = mine.get(name, 0) + value
    for owners in (a.get("tenant_tiers", {}), b.get("tenant_tiers", {})):
        for tenant, tiers in owners.items():  # occupancy: the latest wins; evictions add up
            theirs = out.setdefault("tenant_tiers", {}).setdefault(tenant, {})
            for tier, values in tiers.items():
                before = theirs.get(tier, {}).get("evictions", 0)
                theirs[tier] = {**values, "evictions": before + values.get("evictions", 0)}
    for tenants in (a.get("tenants", {}), b.get("tenants", {})):
        for tenant, values in tenants.items():
            theirs = out.setdefault("tenants", {}).setdefault(tenant, {})
            for name, value in values.items():
                theirs[name] = theirs.get(name, 0) + value
    return out


class PrefillRate:
    """Prefill tokens per second, measured on this engine from its steps.

    With ``path`` (a file in the engine's disk tier directory), the measure is kept across
    restarts: a restarted engine that serves hits before it has computed anything prices them
    at the rate it measured before.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._steps: deque[tuple[int, float]] = deque(maxlen=RATE_STEPS)
        self._last: float | None = None
        self._tokens = 0
        self._path = path
        self._saved_at = float("-inf")
        if path is not None:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                kept = json.loads(path.read_text())
                tokens, seconds = int(kept["tokens"]), float(kept["seconds"])
                if tokens > 0 and seconds > 0:
                    self._steps.append((tokens, seconds))

    def step(self, tokens: int) -> None:
        """A step was scheduled with ``tokens`` tokens; the previous one has ended."""
        now = time.perf_counter()
        if self._last is not None and self._tokens >= RATE_MIN_TOKENS:
            self._steps.append((self._tokens, now - self._last))
            if now - self._saved_at >= SAVE_EVERY_S:
                self._saved_at = now
                self._save()
        self._last, self._tokens = now, tokens

    @property
    def tokens_per_s(self) -> float | None:
        seconds = sum(s for _, s in self._steps)
        return sum(t for t, _ in self._steps) / seconds if seconds > 0 else None

    def _save(self) -> None:
        if self._path is None:
            return
        tokens = sum(t for t, _ in self._steps)
        seconds = sum(s for _, s in self._steps)
        with contextlib.suppress(OSError):  # metrics must never fail a step
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"tokens": tokens, "seconds": seconds}))
            os.replace(tmp, self._path)


def tier_deltas(now: StoreStats, before: StoreStats | None) -> dict[str, dict[str, int]]:
    """Per-tier counters that grew between two snapshots of a store's stats."""
    out: dict[str, dict[str, int]] = {}
    for tier, stats in now.tiers.items():
        old = before.tiers.get(tier) if before else None
        values = {}
        for name in TIER_COUNTERS[1:]:  # the store counts all but loaded tokens
            grew = getattr(stats, name) - (getattr(old, name) if old else 0)
            if grew:
                values[name] = grew
        if values:
            out[tier] = values
    return out


class KvtierPromMetrics(KVConnectorPromMetrics):
    """``kvtier:*`` Prometheus series, fed by :class:`KvtierStats` payloads."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter: Any = self._counter_cls  # vLLM's types are a union of the three
        gauge: Any = self._gauge_cls
        histogram: Any = self._histogram_cls
        self._engines = per_engine_labelvalues
        helps = {
            "lookups": "requests kvtier looked up",
            "requested_tokens": "prompt tokens of the requests looked up",
            "vllm_prefix_tokens": "prompt tokens vLLM's own prefix cache already had",
            "hit_tokens": "prompt tokens kvtier held and was to load",
            "recomputed_tokens": "prompt tokens computed after vLLM's and kvtier's hits",
            "prefill_seconds_saved": "prefill seconds the loaded tokens saved, at the prefill"
            " rate measured on this engine",
        }

        def counters(prefix: str, texts: dict[str, str], labels: list[str]) -> dict[str, Any]:
            return {
                name: counter(f"{prefix}{name}", documentation=text, labelnames=labels)
                for name, text in texts.items()
            }

        self._counters = counters("kvtier:", helps, labelnames)
        # Per tenant (with --tenants): the label is the tenant's name, from the tenants file
        # this API server was given; any other id counts as "other" (a bounded label set).
        self._tenant_names = _tenant_names()
        tenant_helps = {
            "requested_tokens": "prompt tokens of the tenant's requests looked up",
            "vllm_prefix_tokens": "the tenant's prompt tokens vLLM's own prefix cache had",
            "hit_tokens": "prompt tokens kvtier held for the tenant and was to load",
            "loaded_tokens": "prompt tokens loaded for the tenant",
        }
        self._tenant_counters = counters("kvtier:tenant_", tenant_helps, [*labelnames, "tenant"])
        # Each tenant's part of the tiers that divide their room among tenants (quotas).
        self._tenant_tier_gauges = {
            name: gauge(
                f"kvtier:tenant_tier_{name}",
                documentation=text,
                labelnames=[*labelnames, "tenant", "tier"],
                multiprocess_mode="mostrecent",
            )
            for name, text in {
                "used_bytes": "bytes the tenant's chunks take in the tier",
                "share_bytes": "the tenant's quota in the tier, or its equal share of it",
            }.items()
        }
        self._tenant_tier_evictions = counter(
            "kvtier:tenant_tier_evictions",
            documentation="the tenant's chunks evicted from the tier",
            labelnames=[*labelnames, "tenant", "tier"],
        )
        tier_helps = {
            "loaded_tokens": "prompt tokens loaded from the tier",
            "bytes_read": "bytes read from the tier",
            "bytes_written": "bytes written to the tier (as it stores them: its codec's)",
            "tokens_written": "logical tokens of the chunks written to the tier",
            "raw_bytes_written": "bytes the chunks written to the tier take stored raw, in the"
            " engine's dtype (bytes_written / this: the tier codec's ratio)",
            "evictions": "chunks evicted from the tier",
            "corruptions": "chunks that failed verification (deleted, recomputed)",
            "errors": "failed calls to the tier",
            "writes_dropped": "writes skipped (queue full or tier down)",
            "writes_existing": "chunks not sent: another engine had stored them (an object"
            " tier's conditional upload)",
        }
        tiered = [*labelnames, "tier"]
        self._tier_counters = counters("kvtier:tier_", tier_helps, tiered)
        gauge_helps = {
            "up": "1 while the tier answers, 0 while it is taken out (recompute instead)",
            "used_bytes": "bytes the tier holds",
            "chunks": "chunks the tier holds",
            "capacity_bytes": "the tier's capacity (absent when it does not bound itself)",
            "tokens": "logical tokens the tier holds: its bytes at the tokens per stored byte"
            " of the chunks written to it since the start (absent before the first)",
        }
        self._gauges = {
            name: gauge(
                f"kvtier:tier_{name}",
                documentation=text,
                labelnames=tiered,
                multiprocess_mode="mostrecent",
            )
            for name, text in gauge_helps.items()
        }
        self._times = {
            "load_s": histogram(
                "kvtier:load_seconds",
                documentation="time to load one request's hit",
                labelnames=labelnames,
                buckets=LOAD_BUCKETS,
            ),
            "save_s": histogram(
                "kvtier:save_seconds",
                documentation="time to store one request's new chunks, from gathered to held by"
                " the top tier and queued for the others (held by all with write-through)",
                labelnames=labelnames,
                buckets=LOAD_BUCKETS,
            ),
        }
        self._declare(vllm_config)
        LIVE.append(self)

    def refresh(self, states: dict[str, Any]) -> None:
        """The tiers' occupancy and each tenant's part, as the worker holds them now (its
        feed's ``/kvtier/states``): an idle engine runs no steps, so its reports would leave
        these gauges where the last step left them (a save ends after its step). Gauges only
        (evictions are counted from the steps' reports); the first engine's (``kvtier serve``
        runs one per API server)."""
        if not self._engines:
            return
        labels = [str(v) for v in self._engines[min(self._engines)]]
        for tier, values in states.get("tiers", {}).items():
            for name, value in values.items():
                if name in self._gauges and value is not None:
                    self._gauges[name].labels(*labels, tier).set(value)
        self._observe_owners(labels, states.get("tenant_tiers", {}), evictions=False)

    def _declare(self, vllm_config: Any) -> None:
        """Every series of every configured tier at 0, and the capacities, from the start: an
        engine that has not run a step yet shows its tiers (and rate() sees first increments)."""
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        try:
            ConnectorOptions.take(extra)
            tiers = config_from_dict(extra, "kv_connector_extra_config").tiers
        except ConfigError:  # the connector itself reports it
            return
        for values in self._engines.values():
            labels = [str(v) for v in values]
            for series in [*self._counters.values(), *self._times.values()]:
                series.labels(*labels)
            for name in self._tenant_names.values():
                for counter in self._tenant_counters.values():
                    counter.labels(*labels, name)
            for tier in tiers:
                for counter in self._tier_counters.values():
                    counter.labels(*labels, tier.name)
                capacity = getattr(tier, "capacity", None)
                if capacity:
                    self._gauges["capacity_bytes"].labels(*labels, tier.name).set(capacity)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(v) for v in self._engines.get(engine_idx, [])]
        for name, value in transfer_stats_data.get("counters", {}).items():
            if name in self._counters and value > 0:
                self._counters[name].labels(*labels).inc(value)
        for tier, values in transfer_stats_data.get("tiers", {}).items():
            for name, value in values.items():
                if name in self._tier_counters and value > 0:
                    self._tier_counters[name].labels(*labels, tier).inc(value)
                elif name in self._gauges and value is not None:
                    self._gauges[name].labels(*labels, tier).set(value)
        for times, histogram in self._times.items():
            for seconds in transfer_stats_data.get(times, ()):
                histogram.labels(*labels).observe(seconds)
        self._observe_owners(labels, transfer_stats_data.get("tenant_tiers", {}))
        for tenant, values in transfer_stats_data.get("tenants", {}).items():
            name = self._tenant_names.get(tenant, "other")
            for counter_name, value in values.items():
                if counter_name in self._tenant_counters and value > 0:
                    self._tenant_counters[counter_name].labels(*labels, name).inc(value)

    def _observe_owners(
        self, labels: list[str], owners: dict[str, Any], evictions: bool = True
    ) -> None:
        """Each tenant's occupancy of each tier, and (``evictions``) its evictions since the
        last report."""
        by_name: dict[tuple[str, str], dict[str, float]] = {}
        for tenant, tiers in owners.items():
            name = "unknown" if tenant == "unknown" else self._tenant_names.get(tenant, "other")
            for tier, values in tiers.items():
                mine = by_name.setdefault((name, tier), {})
                for field_name in ("used_bytes", "share_bytes", "evictions"):
                    mine[field_name] = mine.get(field_name, 0) + values.get(field_name, 0)
        for (name, tier), values in by_name.items():
            for field_name, gauge in self._tenant_tier_gauges.items():
                gauge.labels(*labels, name, tier).set(values[field_name])
            if evictions and values["evictions"] > 0:
                self._tenant_tier_evictions.labels(*labels, name, tier).inc(values["evictions"])


def _tenant_names() -> dict[str, str]:
    """Tenant names by id, from the tenants file of this API server (none without one)."""
    path = os.environ.get(TENANTS_ENV)
    return load_tenants(path).by_id() if path else {}
