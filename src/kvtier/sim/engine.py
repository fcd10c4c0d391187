"""The replay engine of ``kvtier sim``: requests through tiers driven by the store's own policies.

Semantics (exact, so that runs are comparable with each other and with the bounds):

- A request hits the longest run of its leading ``hash_ids`` held by any tier its node can
  read (its own tiers, then the shared one); after the first miss nothing more is reused.
  Each hit block is counted for the fastest tier holding it.
- Then every block of the request, in order, is used as kvtier's store uses it: a block some
  tier holds is touched in the fastest such tier and copied into the faster ones (the store
  promotes what it reads); a block no tier holds is written to every tier (the store writes
  through, the lower tiers behind). Each tier evicts with its own policy object, the same
  classes the store's tiers run (:mod:`kvtier.policy.eviction`), with the same calls.
- Requests run in timestamp order; with ``nodes`` > 1 each is routed to one node, whose
  DRAM and SSD tiers are its own while the shared tier is common to all.

Bounds, in the same run: an infinite cache (every block ever seen), and Belady's offline
optimum (evict the block whose next use is furthest; a block never used again, or used later
than everything held, is not admitted) for one pool as large as all the tiers of all the
nodes together. Trace ids are prefix hashes (an id fixes its whole prefix), so a block's
ancestors are always used no later than it is, Belady drops descendants first, and prefix
semantics cost it nothing: it is the optimum for this replay.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvtier.errors import ConfigError
from kvtier.policy.eviction import POLICY_NAMES, EvictionPolicy, make_eviction_policy
from kvtier.sim.bounds import belady_hits, infinite_hits
from kvtier.sim.trace import BLOCK_TOKENS, Request

ROUTINGS = ("cache-aware", "round-robin", "random", "kvtier")
LOAD_WINDOW_MS = 60_000.0  # cache-aware routing balances the requests of the last minute
LOAD_SLACK = 0.25  # ... letting a node be this fraction of the mean above the least loaded


@dataclass(frozen=True)
class TierSpec:
    name: str
    capacity_blocks: int  # per node, or in all for a shared tier
    shared: bool = False  # one tier all nodes read and write
    bandwidth: float = 0.0  # bytes/s into the GPUs, for the TTFT estimate
    stored: float = 1.0  # bytes it stores per byte of raw KV (a codec's ratio, scales included)


@dataclass(frozen=True)
class CostModel:
    """What a request's time to first token is made of: loads plus recomputing the rest."""

    bytes_per_token: int
    prefill_s: Callable[[int], float]  # seconds to compute the KV of n prompt tokens


@dataclass
class TierResult:
    name: str
    capacity_blocks: int
    shared: bool
    hit_blocks: int = 0
    hit_tokens: int = 0
    hit_rate_blocks: float = 0.0
    hit_rate_tokens: float = 0.0
    read_bytes: int = 0
    written_bytes: int = 0
    evictions: int = 0


@dataclass
class SimResult:
    policy: str
    nodes: int
    routing: str
    requests: int
    blocks: int
    tokens: int
    block_bytes: int
    hit_blocks: int = 0
    hit_tokens: int = 0
    hit_rate_blocks: float = 0.0
    hit_rate_tokens: float = 0.0
    prefill_tokens_saved: int = 0
    infinite_hit_rate_blocks: float | None = None
    infinite_hit_rate_tokens: float | None = None
    belady_capacity_blocks: int = 0
    belady_hit_rate_blocks: float | None = None
    belady_hit_rate_tokens: float | None = None
    ttft_s: dict[str, float] | None = None  # p50/p90/p99, estimated from the cost model
    ttft_cold_s: dict[str, float] | None = None  # the same with no cache at all
    # The same plus the wait behind earlier prefills on its node (each node prefills one
    # request at a time): what routing trades hits against.
    ttft_queued_s: dict[str, float] | None = None
    tiers: list[TierResult] = field(default_factory=list)
    node_requests: list[int] = field(default_factory=list)  # requests routed to each node
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Tier:
    __slots__ = ("block_bytes", "capacity", "policy", "result")

    def __init__(self, spec: TierSpec, policy: str, result: TierResult, block_bytes: int):
        self.policy: EvictionPolicy = make_eviction_policy(policy)
        self.capacity = spec.capacity_blocks
        self.result = result
        self.block_bytes = int(block_bytes * spec.stored)  # a block as this tier stores it

    def put(self, key: int) -> bool:
        """Write one block the way a tier does: ask the policy for room, evict, insert."""
        policy = self.policy
        victims = policy.victims(1, self.capacity)
        if victims is None:
            return False
        for victim in victims:
            policy.remove(victim)
        self.result.evictions += len(victims)
        policy.insert(key, 1)
        return True


def block_tokens(request: Request) -> list[int]:
    """Tokens of each listed block: 512, except a shorter last block of the prompt."""
    n, length = len(request.hash_ids), request.input_length
    return [min(BLOCK_TOKENS, length - BLOCK_TOKENS * i) for i in range(n)]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {f"p{q}": ordered[min(last, round(q / 100 * last))] for q in (50, 90, 99)}


def validate(tiers: Sequence[TierSpec], policy: str, nodes: int, routing: str) -> None:
    if not tiers:
        raise ConfigError("kvtier sim needs at least one tier with a capacity")
    for spec in tiers:
        if spec.capacity_blocks < 1:
            raise ConfigError(
                f"tier {spec.name!r} holds {spec.capacity_blocks} blocks; it must hold at least"
                f" one {BLOCK_TOKENS}-token block"
            )
    if policy not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {policy!r}; allowed: {', '.join(POLICY_NAMES)}")
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    if routing not in ROUTINGS:
        raise ConfigError(f"unknown routing {routing!r}; allowed: {', '.join(ROUTINGS)}")


def simulate(
    requests: Sequence[Request],
    tiers: Sequence[TierSpec],
    *,
    block_bytes: int,
    policy: str = "lru",
    nodes: int = 1,
    routing: str = "cache-aware",
    seed: int = 0,
    cost: CostModel | None = None,
    bounds: bool = True,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Replay ``requests`` (in timestamp order) through ``tiers``; see the module docstring.

    ``progress`` is called with the number of requests done since its last call.
    """
    validate(tiers, policy, nodes, routing)
    started = time.perf_counter()
    results = [TierResult(s.name, s.capacity_blocks, s.shared) for s in tiers]
    shared = {i: _Tier(s, policy, results[i], block_bytes) for i, s in enumerate(tiers) if s.shared}
    chains = [
        [
            shared[i] if s.shared else _Tier(s, policy, results[i], block_bytes)
            for i, s in enumerate(tiers)
        ]
        for _ in range(nodes)
    ]
    local = [[t for t, s in zip(chain, tiers, strict=True) if not s.shared] for chain in chains]
    tier_index = {id(t): i for chain in chains for i, t in enumerate(chain)}
    rng = random.Random(seed)
    load = [0] * nodes  # cache-aware: requests sent to each node in the last LOAD_WINDOW_MS
    recent: deque[tuple[float, int]] = deque()
    total = SimResult(policy, nodes, routing, len(requests), 0, 0, block_bytes)
    node_requests = [0] * nodes
    if routing == "kvtier" and cost is None:
        raise ConfigError("kvtier routing needs a cost model (a model and hardware)")
    router = _CostRouter(tiers, nodes, cost) if routing == "kvtier" and cost else None
    ttft: list[float] = []
    cold: list[float] = []
    queued: list[float] = []
    busy_until_s = [0.0] * nodes  # when each node's prefills routed so far are done
    step = max(1, len(requests) // 200)

    for number, request in enumerate(requests):
        ids = request.hash_ids
        if nodes == 1:
            node = 0
        elif routing == "round-robin":
            node = number % nodes
        elif routing == "random":
            node = rng.randrange(nodes)
        elif routing == "kvtier":
            assert router is not None and cost is not None
            node = router.route(request, chains, cost)
        else:
            node = _cache_aware(ids, local, load, request.timestamp_ms, recent)
            load[node] += 1
            recent.append((request.timestamp_ms, node))
        node_requests[node] += 1
        chain = chains[node]

        # Lookup: the leading run held somewhere, and which tier serves each block of it.
        served: list[_Tier] = []
        for key in ids:
            for tier in chain:
                if key in tier.policy:
                    served.append(tier)
                    break
            else:
                break
        tokens = block_tokens(request)
        hit_tokens = 0
        loaded = [0] * len(tiers)
        for tier, n in zip(served, tokens, strict=False):
            result = tier.result
            result.hit_blocks += 1
            result.hit_tokens += n
            result.read_bytes += tier.block_bytes
            loaded[tier_index[id(tier)]] += n
            hit_tokens += n
        total.blocks += len(ids)
        total.tokens += request.input_length
        total.hit_blocks += len(served)
        total.hit_tokens += hit_tokens

        # Use every block as the store would: touch where held (promote upwards), else write.
        for key in ids:
            for i, tier in enumerate(chain):
                if key in tier.policy:
                    tier.policy.touch(key)
                    for upper in chain[:i]:
                        if upper.put(key):
                            upper.result.written_bytes += upper.block_bytes
                    break
            else:
                for tier in chain:
                    if tier.put(key):
                        tier.result.written_bytes += tier.block_bytes

        if cost is not None:
            full = cost.prefill_s(request.input_length)
            load_s = sum(
                n * cost.bytes_per_token * spec.stored / spec.bandwidth
                for n, spec in zip(loaded, tiers, strict=True)
                if n
            )
            service = load_s + full - cost.prefill_s(hit_tokens)
            ttft.append(service)
            cold.append(full)
            now_s = request.timestamp_ms / 1000
            start = max(busy_until_s[node], now_s)
            busy_until_s[node] = start + service
            queued.append(start - now_s + service)
        if progress is not None and (number + 1) % step == 0:
            progress(step)
    if progress is not None and len(requests) % step:
        progress(len(requests) % step)

    total.hit_rate_blocks = total.hit_blocks / total.blocks if total.blocks else 0.0
    total.hit_rate_tokens = total.hit_tokens / total.tokens if total.tokens else 0.0
    total.prefill_tokens_saved = total.hit_tokens
    for r in results:
        r.hit_rate_blocks = r.hit_blocks / total.blocks if total.blocks else 0.0
        r.hit_rate_tokens = r.hit_tokens / total.tokens if total.tokens else 0.0
    total.tiers = results
    total.node_requests = node_requests
    if cost is not None:
        total.ttft_s = percentiles(ttft)
        total.ttft_cold_s = percentiles(cold)
        total.ttft_queued_s = percentiles(queued)
    total.belady_capacity_blocks = sum(
        s.capacity_blocks * (1 if s.shared else nodes) for s in tiers
    )
    if bounds:
        inf = infinite_hits(requests)
        opt = belady_hits(requests, total.belady_capacity_blocks)
        total.infinite_hit_rate_blocks, total.infinite_hit_rate_tokens = _rates(inf, total)
        total.belady_hit_rate_blocks, total.belady_hit_rate_tokens = _rates(opt, total)
    total.elapsed_s = time.perf_counter() - started
    return total


def _cache_aware(
    ids: Sequence[int],
    local: list[list[_Tier]],
    load: list[int],
    now_ms: float,
    recent: deque[tuple[float, int]],
) -> int:
    """The node holding the longest prefix locally, among those not overloaded.

    Load is the number of requests a node was sent in the last ``LOAD_WINDOW_MS``; a node
    more than ``max(2, LOAD_SLACK x the mean)`` above the least loaded one is passed over,
    as routers such as SGLang's and Dynamo's do: matching on the prefix alone sends every
    request that shares a system prompt to one node and leaves the others' caches idle.
    Ties go to the least loaded node, then the lowest index.
    """
    while recent and recent[0][0] < now_ms - LOAD_WINDOW_MS:
        load[recent.popleft()[1]] -= 1
    ceiling = min(load) + max(2.0, LOAD_SLACK * sum(load) / len(load))
    candidates = [n for n in range(len(load)) if load[n] <= ceiling]
    return max(candidates, key=lambda n: (_prefix(ids, local[n]), -load[n], -n))


class _CostRouter:
    """``--routing kvtier``: the router's own policy object (:class:`CostRouting`) on the
    simulated nodes. Each node serves prefills one at a time: its queue is the work routed to
    it that has not finished at the request's arrival, at its prefill rate."""

    def __init__(self, tiers: Sequence[TierSpec], nodes: int, cost: CostModel):
        from kvtier.policy.routing import CostRouting

        self.policy = CostRouting(cost.bytes_per_token)
        local = [s for s in tiers if not s.shared]
        # A node's own tiers are its DRAM then its disk; the shared tier and the object
        # store (G4) are the pod's.
        self.kinds = [
            ("object" if s.name == "object" else "shared")
            if s.shared
            else ("dram" if local.index(s) == 0 else "disk")
            for s in tiers
        ]
        self.bandwidth = {  # of raw KV: a tier storing a codec delivers it faster
            k: s.bandwidth / s.stored
            for k, s in zip(self.kinds, tiers, strict=True)
            if s.bandwidth > 0
        }
        self.busy_until_ms = [0.0] * nodes
        self.cost = cost

    def route(self, request: Request, chains: Sequence[Sequence[_Tier]], cost: CostModel) -> int:
        from kvtier.policy.routing import EngineView, leading_hits

        now = request.timestamp_ms
        length = max(request.input_length, 1)
        rate = length / max(cost.prefill_s(length), 1e-9)
        tokens = block_tokens(request)
        views = []
        for node, chain in enumerate(chains):
            kinds = []
            for key in request.hash_ids:
                held = [k for k, t in zip(self.kinds, chain, strict=True) if key in t.policy]
                if not held:
                    break
                kinds.append(held)
            backlog_s = max(0.0, self.busy_until_ms[node] - now) / 1000
            hits = leading_hits(kinds, tokens)
            views.append(EngineView(str(node), hits, int(backlog_s * rate), rate, self.bandwidth))
        decision = self.policy.choose(request.input_length, views)
        best = decision.best
        start = max(self.busy_until_ms[decision.chosen], now)
        self.busy_until_ms[decision.chosen] = start + (best.load_s + best.recompute_s) * 1000
        return decision.chosen


def _prefix(ids: Sequence[int], tiers: Sequence[_Tier]) -> int:
    n = 0
    for key in ids:
        if not any(key in t.policy for t in tiers):
            break
        n += 1
    return n


def _rates(hits: tuple[int, int], total: SimResult) -> tuple[float, float]:
    blocks, tokens = hits
    return (
        blocks / total.blocks if total.blocks else 0.0,
        tokens / total.tokens if total.tokens else 0.0,
    )
