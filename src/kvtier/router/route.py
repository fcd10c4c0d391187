"""From a request to its route: tokenize, key, find where the chunks are, price each engine,
choose (:class:`Routing`); and the prefill tokens a routed request adds to its engine's queue,
owned by its :class:`Route` alone.

Routing reads the prompt's tokens as the engine will see them (:mod:`.prompts`), its chunk keys
in the engines' namespace (reported by their feeds), where those chunks are (the index fed by
every engine, plus the shared tier, asked directly), then takes the engine with the lowest
expected time to first token (:class:`~kvtier.policy.routing.CostRouting`) and, in a
disaggregated pod, whether a prefill engine computes the prompt first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvtier.keys import Namespace
from kvtier.policy.routing import CostRouting, EngineView, Split, reason, split_cost
from kvtier.policy.scheduling import GATHER_S, GATHER_SHARE
from kvtier.router.engines import Engine, EngineSet, Timing
from kvtier.router.index import ChunkIndex
from kvtier.router.lookup import PromptKeys, SharedTier, held_hits
from kvtier.router.prompts import Leading, Prompter, PromptError
from kvtier.router.reuse import Decision, Decisions

log = logging.getLogger("kvtier.router")

POLICIES = ("kvtier", "round-robin")
PHASE_WINDOW = 2048  # timings kept per phase of the router's overhead
INLINE_CHARS = 32_000  # longer completion texts are tokenized off the event loop


@dataclass
class Route:
    """Where one request goes, and what was predicted of it there.

    ``queued`` is the prefill tokens it adds to its engine's queue (``Engine.queued_tokens``
    and, per request, ``Engine.queued_work``, which the routing of later requests weighs).
    Only these methods change them, through ``Engine.enqueue``/``dequeue``: the
    request is in the queue inside :meth:`in_queue`, leaves it at its first token
    (:meth:`first_token`) or at the end of :meth:`in_queue` at the latest, whatever happens in
    between (a retry, an engine that dies mid-request), so no path leaks or counts twice.
    """

    engine: Engine
    queued: int  # prefill tokens it adds to the engine's queue
    idle: bool  # nothing else was queued there (its TTFT measures the prefill rate)
    load_s: float
    prefill: Route | None = None  # the prefill engine to go through first (disaggregated)
    split: Split | None = None  # what the disaggregation decision weighed
    decision: Decision | None = None  # for the console, and routing precision
    waited_s: float = 0.0  # a cold prompt's wait for its burst's companions (not overhead)
    counted: bool = field(default=False, init=False)  # its tokens are in the engine's queue
    _timing: Timing | None = field(default=None, init=False)  # it found the engine idle

    @contextmanager
    def in_queue(self) -> Iterator[Route]:
        """Its tokens in its engine's queue for the time of the block (entered once)."""
        assert not self.counted, "a route enters its engine's queue once"
        if self.queued:
            self.engine.enqueue(self.queued)
            if self.idle and self.engine.timing is None:
                self._timing = self.engine.timing = Timing(self.queued)
        self.counted = True
        try:
            yield self
        finally:
            self._leave()

    def first_token(self, engine: Engine, sent: float) -> None:
        """``engine`` answered with a first token, ``sent`` (perf_counter) after the request
        left: out of the queue, and the engine's prefill rate measured if it was idle."""
        if engine is not self.engine or not self.queued:
            return
        timing = self._timing
        if timing is not None and engine.timing is timing:
            engine.measured_prefill(timing.tokens, time.perf_counter() - sent - self.load_s)
        self._leave()

    def computes_nothing(self) -> None:
        """A prefill engine computed the prompt: this engine loads it (before :meth:`in_queue`)."""
        assert not self.counted
        self.queued = 0

    def resize(self, delta: int) -> None:
        """The prompt turned out ``delta`` tokens longer (or shorter) than routed on."""
        if self.queued > 0:
            delta = max(delta, -self.queued)
            if self.counted:
                timing, self.engine.timing = self.engine.timing, None  # not a joiner
                self.engine.dequeue(self.queued)
                if self.queued + delta:
                    self.engine.enqueue(self.queued + delta)
                self.engine.timing = timing
                if timing is not None and timing is self._timing:
                    timing.grew(delta)
            self.queued += delta

    def _leave(self) -> None:
        if self.counted and self.queued:
            self.engine.dequeue(self.queued)
            if self._timing is not None and self.engine.timing is self._timing:
                self.engine.timing = None
        self.queued = 0


class Routing:
    """The router's choice of engines for each request (the HTTP layer, :mod:`.app`, forwards
    it): a plain object with the engines, their index and the shared tier."""

    def __init__(
        self,
        engines: EngineSet,
        index: ChunkIndex,
        prompter: Prompter | None,
        policy: str = "kvtier",
        shared: SharedTier | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; allowed: {', '.join(POLICIES)}")
        self.engines, self.index, self.prompter = engines, index, prompter
        self.policy, self.shared = policy, shared
        self._cost: CostRouting | None = None
        self._turn = 0
        self.reasons: Counter[str] = Counter()  # why each request went where it went
        self.reuse = Decisions()  # recent decisions, predicted vs reused tokens
        self.phases: dict[str, deque[float]] = {}  # where the overhead goes
        self.gathered = 0  # cold prompts that waited for their burst's companions
        self._background: set[asyncio.Task[None]] = set()

    def shared_tier(self, info: dict[str, Any]) -> SharedTier | None:
        """The tier the engines say they share (from an engine's /kvtier/info), once."""
        if self.shared is None and info.get("shared"):
            first = info["shared"][0]
            self.shared = SharedTier(
                first["url"],
                first["prefix"],
                bool(first.get("cluster")),
                first.get("username") or "",
                first.get("password_file") or "",
            )
        return self.shared

    def phase(self, name: str, seconds: float) -> None:
        self.phases.setdefault(name, deque(maxlen=PHASE_WINDOW)).append(seconds)

    async def route(self, path: str, body: dict[str, Any]) -> tuple[list[Engine], Route | None]:
        """Engines to try, best first, and the route of the first (with the prefill engine to
        go through first, in a disaggregated pod). No route: nothing to account for (round
        robin, no feed yet, a prompt that cannot be tokenized)."""
        healthy = self.engines.healthy()
        if not healthy:
            return [], None
        if self.policy == "round-robin" or self.prompter is None:
            self._turn += 1
            start = self._turn % len(healthy)
            return healthy[start:] + healthy[:start], None
        info = next((e.info for e in self.engines.engines if e.healthy and e.info), None)
        if info is None:  # no feed yet: balance on the queues alone
            return sorted(healthy, key=lambda e: e.queued_tokens), None
        chunk, block = int(info["chunk_tokens"]), int(info["block_size"])
        granule = int(info.get("tail_tokens") or 0) or None
        began = time.perf_counter()
        try:
            prompt_text = body.get("prompt")
            if isinstance(prompt_text, str) and len(prompt_text) > INLINE_CHARS:
                lead = Leading.of(await asyncio.to_thread(self.prompter.tokens, path, body))
            else:  # a chat tokenizes only its new pieces (their head, when long): no hop
                lead = self.prompter.leading(path, body, chunk)
        except PromptError:
            return sorted(healthy, key=lambda e: e.queued_tokens), None
        salt = body.get("cache_salt")
        namespace = Namespace(**info["namespace"], tenant_salt=salt or None)
        prompt = PromptKeys(lead.tokens, namespace, chunk, block, lead.complete, granule)
        shared = self.shared_tier(info)
        keyed = time.perf_counter()
        if shared is not None:
            prompt.in_shared(await shared.holds(prompt.all_keys))
        seen = self._held_anywhere(prompt.hexes[-1:]) or prompt.shared[-1:] == [True]
        if not lead.complete and seen:  # seen before after all: key all of it
            lead = lead.whole()
            prompt = PromptKeys(lead.tokens, namespace, chunk, block, granule=granule)
            if shared is not None:
                prompt.in_shared(await shared.holds(prompt.all_keys))
        asked = time.perf_counter()
        scoring = asked
        if self._gathers(healthy, prompt, lead.total, int(info["bytes_per_token"])):
            await asyncio.sleep(GATHER_S)  # a wait chosen, not overhead: not in the phases
            self.gathered += 1
            healthy = self.engines.healthy() or healthy
            scoring = time.perf_counter()
        order, route = self._choose(healthy, prompt, lead.total, body, int(info["bytes_per_token"]))
        route.waited_s = scoring - asked
        self.phase("tokenize_key", keyed - began)
        self.phase("shared_tier", asked - keyed)
        self.phase("score", time.perf_counter() - scoring)
        if not lead.complete:  # the rest, off the request's path
            task = asyncio.create_task(
                self._complete(lead, namespace, (chunk, block, granule), route)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return order, route

    def _choose(
        self,
        healthy: list[Engine],
        prompt: PromptKeys,
        tokens: int,
        body: dict[str, Any],
        bytes_per_token: int,
    ) -> tuple[list[Engine], Route]:
        """Price every engine for the prompt, take the cheapest; maybe a prefill engine."""
        if self._cost is None:
            self._cost = CostRouting(bytes_per_token)
        views = [self._view(e, prompt) for e in healthy]
        decision = self._cost.choose(tokens, views)
        best = decision.best
        engine = healthy[decision.chosen]
        why = reason(views, decision.chosen)
        self.reasons[why] += 1
        ttft = {id(e): decision.estimates[i].cost_s for i, e in enumerate(healthy)}
        rest = sorted((e for e in healthy if e is not engine), key=lambda e: ttft[id(e)])
        self.index.predict(engine.url, prompt.saved)
        # Its TTFT measures the engine's prefill rate when nothing else was queued there and
        # the response's end is its first token (a stream, or a single token).
        one = body.get("stream") or 1 in (body.get("max_tokens"), body.get("max_completion_tokens"))
        idle = engine.queued_tokens == 0 and bool(one)
        route = Route(engine, tokens - best.hit_tokens, idle, best.load_s)
        route.decision = self.reuse.record(engine.url, why, tokens, best.hit_tokens)
        prefills = self.engines.healthy(prefill_only=True)
        if prefills:
            pviews = [self._view(e, prompt) for e in prefills]
            chosen = views[decision.chosen]
            split = split_cost(self._cost, tokens, chosen, engine.in_flight, pviews, prompt.block)
            route.split = split
            if split.prefill is not None:
                route.decision.measured = False  # the decode engine reuses what P computed
                on = prefills[split.prefill]
                estimate = self._cost.estimate(tokens, pviews[split.prefill])
                self.index.predict(on.url, prompt.saved)
                queued = tokens - estimate.hit_tokens
                route.prefill = Route(on, queued, on.queued_tokens == 0, estimate.load_s)
        return [engine, *rest], route

    def _gathers(
        self, healthy: list[Engine], prompt: PromptKeys, tokens: int, bytes_per_token: int
    ) -> bool:
        """Whether a cold prompt waits a moment before it is routed: nothing holds any of it,
        the engines schedule hits first, and its prefill takes long enough that the wait is
        at most GATHER_SHARE of it. A burst's requests reach the router milliseconds apart;
        routed first, the cold prompt would take an engine before the burst's hits are
        placed, and those whose context is on that engine would load it elsewhere or delay
        it. Routed after them, it goes where the fewest of them wait."""
        if self._cost is None:
            self._cost = CostRouting(bytes_per_token)
        views = [self._view(e, prompt) for e in healthy]
        if len(views) < 2 or not all(v.hits_first for v in views):
            return False
        if any(v.hit_tokens for v in views):
            return False
        fastest = min(self._cost.estimate(tokens, v).recompute_s for v in views)
        return fastest * GATHER_SHARE >= GATHER_S

    def _held_anywhere(self, hexes: list[str]) -> bool:
        return any(self.index.kinds(e.url, hexes) for e in self.engines.engines)

    async def _complete(
        self,
        lead: Leading,
        namespace: Namespace,
        sizes: tuple[int, int, int | None],
        route: Route,
    ) -> None:
        """A prompt routed on its leading tokens: all its tokens now, for the predictions
        (a burst of the same prompt follows the first) and the queue accounting."""
        assert lead.finish is not None
        try:
            whole = await asyncio.to_thread(lead.finish)
        except Exception:  # routing was done already; only its bookkeeping is coarser
            log.exception("kvtier router: tokenizing a prompt failed")
            return
        chunk, block, granule = sizes  # (chunk, block, tail granule)
        prompt = PromptKeys(whole, namespace, chunk, block, granule=granule)
        for part in (route, route.prefill):
            if part is not None:
                self.index.predict(part.engine.url, prompt.saved)
                part.resize(len(whole) - lead.total)

    def _view(self, engine: Engine, prompt: PromptKeys) -> EngineView:
        hits = held_hits(self.index, engine.url, prompt)
        rate = self.engines.prefill_rate(engine)
        return EngineView(
            engine.url,
            hits,
            engine.queued_tokens,
            rate,
            engine.bandwidth,
            tuple(engine.queued_work.elements()),
            engine.hits_first,
        )
