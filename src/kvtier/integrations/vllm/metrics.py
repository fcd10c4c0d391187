"""kvtier's metrics on vLLM's own ``/metrics``, through vLLM's connector statistics API.

Each step, vLLM asks the connector for its statistics (:class:`KvtierStats`): the scheduler side
counts requests (lookups, requested and hit tokens, tokens loaded per tier, recomputed tokens,
load times from the worker's reports, prefill seconds saved); the worker side counts what its
store did per tier (bytes read and written, evictions, corruptions, errors, dropped writes) and,
every few seconds, how full each tier is and whether it is up. vLLM aggregates them and hands
them to the API server's Prometheus logger, which :class:`KvtierPromMetrics` turns into
``kvtier:*`` series (label ``tier``), next to vLLM's ``vllm:*``.

Prefill seconds saved = tokens loaded / the prefill rate this engine measures: tokens scheduled
per second of wall time over recent steps that computed at least :data:`RATE_MIN_TOKENS`
(kept in the disk tier's directory across restarts).
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from kvtier.store import TieredStore
from kvtier.tenants import load_tenants

requests_log = logging.getLogger("kvtier.requests")

TIER_COUNTERS = (
    "loaded_tokens",
    "bytes_read",
    "bytes_written",
    "evictions",
    "corruptions",
    "errors",
    "writes_dropped",
)
TIER_GAUGES = ("up", "used_bytes", "chunks", "capacity_bytes")
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_STEPS = 64  # steps the prefill rate is measured over
RATE_MIN_TOKENS = 64  # fewer: a step of decodes (a hits-first prefill step is ~100-300)
STATES_EVERY_S = 2.0  # how often the worker reports its tiers' occupancy and health
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
        self._counters = {
            name: counter(f"kvtier:{name}", documentation=text, labelnames=labelnames)
            for name, text in helps.items()
        }
        # Per tenant (with --tenants): the label is the tenant's name, from the tenants file
        # this API server was given; any other id counts as "other" (a bounded label set).
        self._tenant_names = _tenant_names()
        tenant_helps = {
            "requested_tokens": "prompt tokens of the tenant's requests looked up",
            "vllm_prefix_tokens": "the tenant's prompt tokens vLLM's own prefix cache had",
            "hit_tokens": "prompt tokens kvtier held for the tenant and was to load",
            "loaded_tokens": "prompt tokens loaded for the tenant",
        }
        self._tenant_counters = {
            name: counter(
                f"kvtier:tenant_{name}", documentation=text, labelnames=[*labelnames, "tenant"]
            )
            for name, text in tenant_helps.items()
        }
        tier_helps = {
            "loaded_tokens": "prompt tokens loaded from the tier",
            "bytes_read": "bytes read from the tier",
            "bytes_written": "bytes written to the tier",
            "evictions": "chunks evicted from the tier",
            "corruptions": "chunks that failed verification (deleted, recomputed)",
            "errors": "failed calls to the tier",
            "writes_dropped": "writes skipped (queue full or tier down)",
        }
        tiered = [*labelnames, "tier"]
        self._tier_counters = {
            name: counter(f"kvtier:tier_{name}", documentation=text, labelnames=tiered)
            for name, text in tier_helps.items()
        }
        gauge_helps = {
            "up": "1 while the tier answers, 0 while it is taken out (recompute instead)",
            "used_bytes": "bytes the tier holds",
            "chunks": "chunks the tier holds",
            "capacity_bytes": "the tier's capacity (absent when it does not bound itself)",
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
        for tenant, values in transfer_stats_data.get("tenants", {}).items():
            name = self._tenant_names.get(tenant, "other")
            for counter_name, value in values.items():
                if counter_name in self._tenant_counters and value > 0:
                    self._tenant_counters[counter_name].labels(*labels, name).inc(value)


REPORT_STEPS = 8  # steps a finished request's line waits for its load report
# Also per tenant, with loaded_tokens.
TENANT_COUNTERS = ("requested_tokens", "vllm_prefix_tokens", "hit_tokens")


def _tenant_names() -> dict[str, str]:
    """Tenant names by id, from the tenants file of this API server (none without one)."""
    path = os.environ.get(TENANTS_ENV)
    return load_tenants(path).by_id() if path else {}


@dataclass
class RequestAccount:
    """One request's tokens, for the line it logs when it ends (``kvtier.requests``): prompt
    tokens, those vLLM's own prefix cache had, those kvtier was to load and what the worker
    loaded from each tier in how long, and what was left to compute."""

    request: str
    prompt_tokens: int
    vllm_prefix_tokens: int
    planned: int  # tokens kvtier was to load
    loaded: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    failed_tokens: int = 0
    reported: bool = False
    waited: int = 0
    tenant: str | None = None  # its tenant's id (kvtier.tenants.tenant_id), with --tenants

    def add(self, report: dict[str, Any]) -> None:
        for tier, tokens in report.get("loaded", {}).items():
            self.loaded[tier] = self.loaded.get(tier, 0) + int(tokens)
        self.load_s += float(report.get("load_s", 0.0))
        self.failed_tokens += int(report.get("failed_tokens", 0))
        self.reported = True

    def line(self) -> dict[str, Any]:
        loaded = sum(self.loaded.values())
        return {
            "request": self.request,
            "prompt_tokens": self.prompt_tokens,
            "vllm_prefix_tokens": self.vllm_prefix_tokens,
            "kvtier_hit_tokens": self.planned,
            "loaded_tokens": self.loaded,
            "load_s": round(self.load_s, 4),
            "failed_tokens": self.failed_tokens,
            "recomputed_tokens": self.prompt_tokens - self.vllm_prefix_tokens - loaded,
            "reported": self.reported or not self.planned,
        }

    def log(self) -> None:
        requests_log.info("kvtier request %s", json.dumps(self.line(), sort_keys=True))


class ConnectorMetrics:
    """A connector's bookkeeping for its log lines and metrics: the account of each running
    request (scheduler side), what the worker's loads reported, this interval's counts, the
    measured prefill rate, and the worker's last store snapshot."""

    def __init__(self, rate_file: Path | None):
        self.rate = PrefillRate(rate_file)
        self._accounts: dict[str, RequestAccount] = {}  # running requests
        self._unreported: dict[str, RequestAccount] = {}  # ended, load report still to come
        self._stats: dict[str, Any] = {}  # this interval's payload (KvtierStats)
        self._seen: StoreStats | None = None  # the worker's store stats last reported
        self._states_at = float("-inf")  # when the worker last reported occupancy

    def looked_up(self, account: RequestAccount) -> None:
        self._accounts[account.request] = account

    def reported(self, loads: list[dict[str, Any]]) -> None:
        """The worker's load reports (KvtierWorkerMetadata.loads)."""
        for report in loads:
            request = report["request"]
            account = self._accounts.get(request) or self._unreported.get(request)
            if account is not None:
                account.add(report)

    def finished(self, request: str) -> None:
        account = self._accounts.pop(request, None)
        if account is None:
            return
        if account.planned and not account.reported:  # the worker's word comes later
            self._unreported[request] = account
        else:
            self._count(account)

    def tick(self) -> None:
        """A step ended: accounts whose report came, or waited long enough, are counted."""
        for request, account in list(self._unreported.items()):
            account.waited += 1
            if account.reported or account.waited > REPORT_STEPS:
                del self._unreported[request]
                self._count(account)

    def _count(self, account: RequestAccount) -> None:
        account.log()
        loaded = sum(account.loaded.values())
        rate = self.rate.tokens_per_s
        counters = {
            "lookups": 1,
            "requested_tokens": account.prompt_tokens,
            "vllm_prefix_tokens": account.vllm_prefix_tokens,
            "hit_tokens": account.planned,
            "recomputed_tokens": account.line()["recomputed_tokens"],
            "prefill_seconds_saved": loaded / rate if rate else 0.0,
        }
        tiers = {tier: {"loaded_tokens": n} for tier, n in account.loaded.items()}
        load_s = [account.load_s] if account.loaded else []
        payload: dict[str, Any] = {"counters": counters, "tiers": tiers, "load_s": load_s}
        if account.tenant is not None:
            mine = {name: counters[name] for name in TENANT_COUNTERS if name in counters}
            payload["tenants"] = {account.tenant: {**mine, "loaded_tokens": loaded}}
        self._stats = merge(self._stats, payload)

    def scheduler_stats(self) -> KvtierStats | None:
        if not self._stats:
            return None
        stats, self._stats = KvtierStats(self._stats), {}
        return stats

    def worker_stats(self, store: TieredStore, save_s: list[float]) -> KvtierStats | None:
        """The store's per-tier counters since the last call and the saves' times
        (``save_s``); occupancy and health every :data:`STATES_EVERY_S`."""
        now = store.stats()
        payload: dict[str, Any] = {"tiers": tier_deltas(now, self._seen), "save_s": save_s}
        self._seen = now
        if time.monotonic() - self._states_at >= STATES_EVERY_S:
            self._states_at = time.monotonic()
            payload = merge(payload, {"tiers": store.tier_states()})
        return KvtierStats(payload) if payload["tiers"] or save_s else None
