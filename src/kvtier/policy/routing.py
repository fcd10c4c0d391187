"""Where a request should run: the expected time to first token on each engine.

One object, :class:`CostRouting`, decides for the router (``kvtier router``, ``kvtier pod``)
and for the simulator (``kvtier sim --routing kvtier``), so what is simulated at 64 nodes is
what runs. It sees each engine as an :class:`EngineView`: the prompt tokens that engine would
find per tier, the prefill work already queued on it, and the rates measured there.

Expected TTFT on an engine = queued prefill tokens / its prefill rate (the wait)
                           + sum over tiers of hit bytes / that tier's bandwidth (the load)
                           + tokens it would recompute / its prefill rate.

The engine chosen is the one where the request costs least: its expected TTFT, plus, on an
engine that schedules hits first, the delay it imposes on the queued requests it overtakes
(each waits for its load and prefill). Without that term a hit would go to the engine
computing a cold prompt whenever it is a little faster there, and every such hit delays the
cold prompt by a whole step; with it, hits spread to engines where they delay no one, and a
cold prompt goes where few hits wait (they would overtake it).

Unlike fixed discounts (a host hit worth 0.75 of a GPU hit, a disk hit 0.25), this prices a
hit in a slow tier against recomputing it *on that engine*, and it credits the tier every
engine shares: a prompt held only there costs the same load everywhere, and the queue decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from kvtier.policy.scheduling import STEP_S

# Bandwidths assumed for a tier before an engine has measured its own (bytes/s). "gpu" is the
# engine's own prefix cache: nothing to load; "object": an S3 bucket (G4).
DEFAULT_BANDWIDTH = {
    "gpu": float("inf"),
    "dram": 4e9,
    "disk": 1e9,
    "shared": 0.6e9,
    "object": 0.3e9,
}
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0
TIER_KINDS = tuple(DEFAULT_BANDWIDTH)  # fastest first
# Estimates within max(TIE_S, TIE_FRACTION x the best) are a tie: the least queued engine
# wins, then engines take turns. Measured prefill rates of equal engines differ by some 10%;
# without this, every cold prompt would go to the one that measured fastest.
TIE_S = 0.002
TIE_FRACTION = 0.1


@dataclass(frozen=True)
class EngineView:
    """One engine, as the policy sees it when a request arrives.

    Attributes:
        name: the engine (its URL in the router, its index in the simulator).
        hits: leading prompt tokens the engine would load, per tier kind (see
            :data:`TIER_KINDS`), each token counted once, in the fastest tier holding it.
        queued_tokens: prefill tokens routed to it whose first token has not come back yet.
        prefill_tokens_per_s: its measured prefill rate.
        bandwidth: its measured load bandwidth per tier kind, bytes/s (defaults otherwise).
        queued: the prefill tokens of each of those requests (they sum to ``queued_tokens``).
        hits_first: it serves the requests with the least to compute first
            (:mod:`kvtier.policy.scheduling`): a request waits only for the queued ones with
            no more work than its own, and for the step under way.
    """

    name: str
    hits: Mapping[str, int] = field(default_factory=dict)
    queued_tokens: int = 0
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    bandwidth: Mapping[str, float] = field(default_factory=dict)
    queued: tuple[int, ...] = ()
    hits_first: bool = False

    @property
    def hit_tokens(self) -> int:
        return sum(self.hits.values())


@dataclass(frozen=True)
class Estimate:
    """What routing a request to one engine is expected to cost."""

    engine: str
    ttft_s: float
    wait_s: float
    load_s: float
    recompute_s: float
    hit_tokens: int
    imposed_s: float = 0.0  # the delay it adds to queued requests it would overtake

    @property
    def cost_s(self) -> float:
        """What routing it there costs the pod: its TTFT and the delay it imposes."""
        return self.ttft_s + self.imposed_s


@dataclass(frozen=True)
class Decision:
    chosen: int  # index into the views given
    estimates: tuple[Estimate, ...]

    @property
    def best(self) -> Estimate:
        return self.estimates[self.chosen]


class CostRouting:
    """Lowest expected TTFT wins; near-ties go to the least queued engine, then in turn.

    ``bytes_per_token``: KV bytes of one token (what a hit loads).
    """

    def __init__(self, bytes_per_token: int):
        if bytes_per_token <= 0:
            raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
        self.bytes_per_token = bytes_per_token
        self._turn = 0  # rotates among exact ties, so a burst of equal requests spreads

    def estimate(self, prompt_tokens: int, view: EngineView) -> Estimate:
        rate = max(view.prefill_tokens_per_s, 1e-9)
        load = 0.0
        for kind, tokens in view.hits.items():
            if tokens <= 0:
                continue
            bandwidth = view.bandwidth.get(kind) or DEFAULT_BANDWIDTH.get(kind, 1e9)
            load += tokens * self.bytes_per_token / bandwidth
        hit = min(view.hit_tokens, prompt_tokens)
        wait = _queued_ahead(prompt_tokens - hit, view) / rate
        recompute = (prompt_tokens - hit) / rate
        overtaken = _overtaken(prompt_tokens - hit, view)
        return Estimate(
            view.name,
            wait + load + recompute,
            wait,
            load,
            recompute,
            hit,
            overtaken * (load + recompute),
        )

    def choose(self, prompt_tokens: int, views: Sequence[EngineView]) -> Decision:
        if not views:
            raise ValueError("no engine to route to")
        estimates = tuple(self.estimate(prompt_tokens, v) for v in views)
        best = min(e.cost_s for e in estimates)
        slack = max(TIE_S, TIE_FRACTION * best)
        close = [i for i, e in enumerate(estimates) if e.cost_s <= best + slack]
        least = min(views[i].queued_tokens for i in close)
        tied = [i for i in close if views[i].queued_tokens == least]
        self._turn += 1
        return Decision(tied[self._turn % len(tied)], estimates)


def _queued_ahead(work: int, view: EngineView) -> float:
    """The queued prefill tokens a request with ``work`` tokens to compute waits for: all of
    them in arrival order; on a hits-first engine, those of requests with no more work than
    its own, and at most one step (:data:`~kvtier.policy.scheduling.STEP_S`) of the others."""
    if not view.hits_first or not view.queued:
        return float(view.queued_tokens)
    ahead = sum(q for q in view.queued if q <= work)
    behind = view.queued_tokens - ahead
    return ahead + min(behind, STEP_S * view.prefill_tokens_per_s)


def _overtaken(work: int, view: EngineView) -> int:
    """How many queued requests one with ``work`` tokens to compute would go ahead of: on a
    hits-first engine, those with more work; elsewhere none (it queues behind them)."""
    if not view.hits_first:
        return 0
    return sum(1 for q in view.queued if q > work)


def leading_hits(tiers_of: Sequence[Sequence[str]], tokens_of: Sequence[int]) -> dict[str, int]:
    """Tokens per tier kind of the leading run of chunks an engine holds.

    ``tiers_of[i]``: the tier kinds holding chunk i there (empty ends the run);
    ``tokens_of[i]``: its tokens. Each chunk counts in its fastest tier.
    """
    hits: dict[str, int] = {}
    for kinds, tokens in zip(tiers_of, tokens_of, strict=False):
        if not kinds:
            break
        fastest = min(kinds, key=_rank)
        hits[fastest] = hits.get(fastest, 0) + tokens
    return hits


def _rank(kind: str) -> int:
    return TIER_KINDS.index(kind) if kind in TIER_KINDS else len(TIER_KINDS)


# What going through a prefill engine adds besides its work: a second request (HTTP, its
# scheduling, its one sampled token) before the decode engine starts.
PREFILL_HOP_S = 0.02


@dataclass(frozen=True)
class Split:
    """Whether a request goes through a prefill engine first (disaggregated) or straight to
    its decode engine, and what each path was expected to cost."""

    disaggregate: bool
    prefill: int | None  # index into the prefill views, when disaggregated
    direct_s: float  # TTFT straight on the decode engine + the stall of its running streams
    split_s: float  # the same, through the best prefill engine first


def split_cost(
    routing: CostRouting,
    prompt_tokens: int,
    decode: EngineView,
    running: int,
    prefills: Sequence[EngineView],
    block_tokens: int,
) -> Split:
    """Prefill elsewhere, or on the decode engine itself? The one that adds less latency.

    Each path costs this request's time to first token plus the stall of every stream
    running on the decode engine (``running``) while that engine computes prompt tokens.
    Straight: the decode engine computes what it does not hold. Through a prefill engine:
    that engine's TTFT, writing what it computed to the shared tier, a second request
    (:data:`PREFILL_HOP_S`), then the decode engine loads the prompt's whole blocks (what
    it holds from its own tiers, the rest from the shared tier; loads run beside its
    streams) and computes only the last partial block. So a decode engine that already holds
    most of the prompt, or has no stream to stall, skips the prefill engine.
    """
    direct = routing.estimate(prompt_tokens, decode)
    direct_s = direct.ttft_s + running * direct.recompute_s
    if not prefills:
        return Split(False, None, direct_s, float("inf"))
    shared = decode.bandwidth.get("shared") or DEFAULT_BANDWIDTH["shared"]
    per_token = routing.bytes_per_token / shared
    best, best_s = 0, float("inf")
    for i, view in enumerate(prefills):
        on_prefill = routing.estimate(prompt_tokens, view)
        written = prompt_tokens - on_prefill.hit_tokens
        cost = on_prefill.ttft_s + written * per_token
        if cost < best_s:
            best, best_s = i, cost
    whole = max(prompt_tokens - 1, 0) // block_tokens * block_tokens
    loaded = dict(decode.hits)
    loaded["shared"] = loaded.get("shared", 0) + max(whole - decode.hit_tokens, 0)
    view = replace(decode, hits=loaded)
    after = routing.estimate(prompt_tokens, view)
    split_s = best_s + PREFILL_HOP_S + after.ttft_s + running * after.recompute_s
    chosen = split_s < direct_s
    return Split(chosen, best if chosen else None, direct_s, split_s)


def reason(views: Sequence[EngineView], chosen: int) -> str:
    """Why the chosen engine: "engine hit" (its own tiers hold the most of the prompt),
    "shared tier" (only the shared tier holds any), "load" (an engine holding more was passed
    over for its queue) or "cold" (nothing held anywhere: the least loaded)."""

    def own(view: EngineView) -> int:
        return sum(n for kind, n in view.hits.items() if kind != "shared")

    mine = own(views[chosen])
    if mine < max(own(v) for v in views):
        return "load"
    if mine > 0:
        return "engine hit"
    return "shared tier" if views[chosen].hits.get("shared") else "cold"
