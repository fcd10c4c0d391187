"""Per request, what the connector's scheduler side saw (:class:`RequestAccount`, the line each
request logs when it ends), and the bookkeeping that turns the accounts and the worker's store
into :class:`~kvtier.integrations.vllm.metrics.KvtierStats` (:class:`ConnectorMetrics`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.integrations.vllm.metrics import (
    STATES_EVERY_S,
    KvtierStats,
    PrefillRate,
    merge,
    tier_deltas,
)
from kvtier.stats import StoreStats
from kvtier.store import TieredStore

requests_log = logging.getLogger("kvtier.requests")

REPORT_STEPS = 8  # steps a finished request's line waits for its load report
# Also per tenant, with loaded_tokens.
TENANT_COUNTERS = ("requested_tokens", "vllm_prefix_tokens", "hit_tokens")


@dataclass
class RequestAccount:
    """One request's tokens, for the line it logs when it ends (``kvtier.requests``): prompt
    tokens, those vLLM's own prefix cache had, those kvtier was to load and what the worker
    loaded from each tier in how long, and what was left to compute."""

    request: str
    prompt_tokens: int
    vllm_prefix_tokens: int
    planned: int  # tokens kvtier was to load
    tenant: str | None = None  # its tenant's id (kvtier.tenants.tenant_id), with --tenants
    loaded: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    failed_tokens: int = 0
    reported: bool = False
    waited: int = 0

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
        self._evictions_seen: dict[tuple[str, str], int] = {}  # per tenant and tier, reported

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

    def _owner_deltas(self, owners: dict[str, dict[str, dict[str, int]]]) -> dict[str, Any]:
        """Each tenant's part of each tier, its evictions counted since the last report (the
        store counts from its start) so that reports add up like every other counter."""
        for tenant, tiers in owners.items():
            for tier, values in tiers.items():
                total = values["evictions"]
                before = self._evictions_seen.get((tenant, tier), 0)
                self._evictions_seen[(tenant, tier)] = total
                values["evictions"] = total - before if total >= before else total
        return owners

    def worker_stats(self, store: TieredStore, save_s: list[float]) -> KvtierStats | None:
        """The store's per-tier counters since the last call and the saves' times
        (``save_s``); occupancy and health every :data:`STATES_EVERY_S`."""
        now = store.stats()
        payload: dict[str, Any] = {"tiers": tier_deltas(now, self._seen), "save_s": save_s}
        self._seen = now
        if time.monotonic() - self._states_at >= STATES_EVERY_S:
            self._states_at = time.monotonic()
            payload = merge(payload, {"tiers": store.tier_states()})
            owners = store.owner_states()
            if owners:
                payload["tenant_tiers"] = self._owner_deltas(owners)
        return KvtierStats(payload) if payload["tiers"] or save_s else None
