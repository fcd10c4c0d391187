"""The router's ``/metrics``: its state (:meth:`kvtier.router.app.Router.state`) as Prometheus
series named ``kvtier:router_*``, made at each scrape from the same numbers ``/router/state``
shows, so the two never disagree.

Per engine (label ``engine``, and ``role``: serve or prefill): up, queued prefill tokens,
requests in flight, requests routed, measured prefill rate, vLLM block-event gaps, index
resyncs, chunks the index holds per tier kind (label ``tier``). Router-wide: why requests went
where they went (label ``reason``), prefill/decode decisions (label ``decision``), retries,
reuse predicted vs reported by the engines (precision = matched / predicted tokens), the shared
tier's late answers, index size, event staleness and the router's own overhead
(quantiles 0.5 and 0.99).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _StateCollector(Collector):
    def __init__(self, state: dict[str, Any]):
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        engines = state.get("engines", [])
        per = ["engine", "role"]

        def engine_gauge(name: str, text: str, field: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"kvtier:router_engine_{name}", text, labels=per)
            for e in engines:
                family.add_metric([e["url"], e["role"]], float(e.get(field) or 0))
            return family

        up = GaugeMetricFamily("kvtier:router_engine_up", "1 while in rotation", labels=per)
        for e in engines:
            up.add_metric([e["url"], e["role"]], 1.0 if e["healthy"] else 0.0)
        yield up
        yield engine_gauge(
            "queued_tokens", "prefill tokens routed, first token not back yet", "queued_tokens"
        )
        yield engine_gauge("in_flight", "requests being served", "in_flight")
        yield engine_gauge(
            "prefill_tokens_per_second",
            "prefill rate measured on the engine",
            "prefill_tokens_per_s",
        )
        routed = CounterMetricFamily(
            "kvtier:router_engine_routed", "requests routed to the engine", labels=per
        )
        gaps = CounterMetricFamily(
            "kvtier:router_engine_vllm_event_gaps",
            "times vLLM's KV events were lost or restarted",
            labels=per,
        )
        for e in engines:
            routed.add_metric([e["url"], e["role"]], float(e.get("routed") or 0))
            blocks = e.get("vllm_blocks") or {}
            gaps.add_metric([e["url"], e["role"]], float(blocks.get("gaps") or 0))
        yield routed
        yield gaps

        index = state.get("index", {})
        held = GaugeMetricFamily(
            "kvtier:router_index_chunks_held",
            "chunks the index places on the engine, per tier kind",
            labels=["engine", "tier"],
        )
        for engine, kinds in (index.get("per_engine") or {}).items():
            for kind, n in kinds.items():
                held.add_metric([engine, kind], float(n))
        yield held
        yield GaugeMetricFamily(
            "kvtier:router_index_chunks",
            "chunk keys in the index",
            value=float(index.get("chunks") or 0),
        )
        yield _by(
            CounterMetricFamily,
            "kvtier:router_index_resyncs",
            "snapshots taken of an engine's feed (start, gap, restart)",
            "engine",
            index.get("resyncs"),
        )
        stale = index.get("staleness") or {}
        yield _by(
            GaugeMetricFamily,
            "kvtier:router_index_staleness_seconds",
            "time from an event at an engine to the index",
            "quantile",
            {q: stale[f] for q, f in (("0.5", "p50_s"), ("0.99", "p99_s")) if f in stale},
        )

        yield _by(
            CounterMetricFamily,
            "kvtier:router_decisions",
            "requests routed, by why that engine",
            "reason",
            state.get("reasons"),
        )
        yield _by(
            CounterMetricFamily,
            "kvtier:router_prefill_decisions",
            "disaggregated pods: through a prefill engine or not",
            "decision",
            state.get("decisions"),
        )
        yield CounterMetricFamily(
            "kvtier:router_retries",
            "requests retried on another engine",
            value=float(state.get("retries") or 0),
        )
        yield CounterMetricFamily(
            "kvtier:router_shared_late_answers",
            "shared-tier lookups answered after their budget",
            value=float(state.get("shared_late_answers") or 0),
        )
        reuse = state.get("reuse") or {}
        for field, text in (
            ("measured", "requests whose engine reported the prompt tokens it reused"),
            ("predicted_tokens", "prompt tokens the router expected those engines to reuse"),
            ("reused_tokens", "prompt tokens those engines reused (their usage's cached tokens)"),
            ("matched_tokens", "per request, the smaller of predicted and reused tokens"),
        ):
            name = "requests" if field == "measured" else field
            yield CounterMetricFamily(
                f"kvtier:router_reuse_{name}", text, value=float(reuse.get(field) or 0)
            )
        quantiles = (("0.5", "overhead_ms_p50"), ("0.99", "overhead_ms_p99"))
        yield _by(
            GaugeMetricFamily,
            "kvtier:router_overhead_seconds",
            "the router's own time per request (tokenize, key, score, first byte)",
            "quantile",
            {q: state[f] / 1000 for q, f in quantiles if f in state},
        )


def _by(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    text: str,
    label: str,
    values: dict[str, Any] | None,
) -> Metric:
    """A family with one label: a sample per (label value, value) of ``values``."""
    family = kind(name, text, labels=[label])
    for key, value in (values or {}).items():
        family.add_metric([key], float(value))
    return family


def router_metrics(state: dict[str, Any]) -> tuple[bytes, str]:
    """(Prometheus text, its content type) of a router's ``state``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StateCollector(state))
    return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"
