"""The hits-first scheduler: vLLM's scheduler, with requests ordered by the work they still need
and steps kept short (the rules are :mod:`kvtier.policy.scheduling`'s).

``kvtier serve`` runs vLLM with ``--scheduler-cls kvtier.integrations.vllm.hits_first.scheduler``
and ``--scheduling-policy priority``. What this adds to vLLM's own scheduler:

- At arrival, a request's priority (:func:`~kvtier.policy.scheduling.priority_ms`) from the
  tokens it would compute: its prompt less the longest prefix held by vLLM's prefix cache or by
  kvtier (the connector's lookup, before any scheduling). vLLM's priority queue then serves
  waiting requests in that order; a ``priority`` the client gave still comes first.
- At each step, the token budget of a step that lasts ``step_s`` (the step model, fitted to
  the steps this engine ran) right after an arrival, also for a request alone: the first of a
  burst is alone for the few milliseconds its companions take to arrive. With no arrival the
  steps grow, twice as long each, up to ``max_step_s``. Prefills already under way that rank
  behind a waiting request sit the step out: vLLM serves running requests before waiting
  ones, so without that a cold prompt's next chunk would take the step a hit waits for, and a
  hit whose background load just ended would still wait behind cold prefills queued before
  it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from kvtier.errors import ConfigError
from kvtier.integrations.front import Front, OnTheWay
from kvtier.integrations.vllm.context import WHERE, log
from kvtier.keys import tail_granule
from kvtier.policy.scheduling import (
    GATHER_SHARE,
    SchedulingOptions,
    StepModel,
    first_answers,
    priority_ms,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ModelRunnerOutput

CLIENT_PRIORITY = 10**13  # ms: a client's own priority outranks any kvtier gives (300 years)
READY = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


def scheduling_options(vllm_config: VllmConfig) -> SchedulingOptions:
    """The ``scheduling`` key of ``kv_connector_extra_config`` (defaults without one)."""
    transfer = vllm_config.kv_transfer_config
    extra = (transfer.kv_connector_extra_config or {}) if transfer else {}
    given = extra.get("scheduling") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{WHERE}: scheduling: expected an object, got {given!r}")
    try:
        return SchedulingOptions(**given)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{WHERE}: scheduling: {exc}") from None


class HitsFirst:
    """What the hits-first scheduler adds to vLLM's; mixed in before vLLM's class."""

    # vLLM's Scheduler attributes this class uses (set by its __init__).
    running: list[Request]
    waiting: Any
    kv_holding_waiting: Any
    finished_recving_kv_req_ids: set[str]
    kv_cache_manager: Any
    connector: Any
    max_num_scheduled_tokens: int
    max_num_active_reqs: int
    requests: dict[str, Request]
    block_size: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        vllm_config: VllmConfig = kwargs["vllm_config"]
        self.options = scheduling_options(vllm_config)
        policy = vllm_config.scheduler_config.policy
        if self.options.hits_first and policy != "priority":
            raise ConfigError(
                "kvtier's hits-first scheduler needs vLLM's --scheduling-policy priority"
                f" (got {policy}); kvtier serve sets it"
            )
        super().__init__(*args, **kwargs)
        assert not self.options.hits_first or self.policy == SchedulingPolicy.PRIORITY  # type: ignore[attr-defined]
        self.model = StepModel()
        self.clock: Callable[[], float] = time.monotonic  # tests drive a simulated one
        self._epoch = time.time()  # vLLM's arrival times are time.time()
        self.wall: Callable[[], float] = time.time  # the clock of arrival times
        self._full_budget = int(self.max_num_scheduled_tokens)
        self._steps: deque[tuple[int, float]] = deque()  # (id of an output, when scheduled)
        self._last_done = 0.0
        self._stalled_on: str | None = None  # a first-ranked request that found no room
        self._calm = 0  # steps since a request arrived or waited ahead of a prefill
        self._work: dict[str, int] = {}  # a waiting request's expected prefill, in tokens
        self._given: dict[str, float] = {}  # when the engine was given a waiting request
        front = Front.from_env() if self.options.hits_first else None
        self.on_the_way = OnTheWay(front) if front is not None else None
        if self.options.hits_first:
            log.info(
                "kvtier: hits-first scheduling (steps of about %.2fs, patience %.1fx)",
                self.options.step_s,
                self.options.patience,
            )

    # -- arrival: the priority ------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if self.options.hits_first and request.request_id not in self.requests:
            work = request.num_prompt_tokens - self._held(request)
            if len(self._work) > 2 * len(self.requests) + 64:  # forget the finished
                self._work = {k: v for k, v in self._work.items() if k in self.requests}
                self._given = {k: v for k, v in self._given.items() if k in self.requests}
            self._work[request.request_id] = work
            self._given[request.request_id] = self.wall()
            if self.on_the_way is not None:
                self.on_the_way.given += 1
            arrival = request.arrival_time - self._epoch
            ours = priority_ms(arrival, work, self.model, self.options.patience)
            request.priority = request.priority * CLIENT_PRIORITY + ours
            self._calm = 0
        super().add_request(request)  # type: ignore[misc]

    def _held(self, request: Request) -> int:
        """The longest prefix of the prompt held by vLLM's prefix cache or by kvtier."""
        held = 0
        manager = self.kv_cache_manager
        if manager.prefix_cache_lookup_enabled(request):
            hit = manager.coordinator.find_longest_cache_hit(
                request.block_hashes, request.num_tokens - 1
            )
            held = int(hit[1])
        side = getattr(self.connector, "scheduler", None)
        if side is not None and hasattr(side, "held_tokens"):
            held = max(held, int(side.held_tokens(request)))
        # vLLM computes the last prompt token itself; a load ends on a tail granule.
        granule = tail_granule(int(self.block_size))
        return min(held, (int(request.num_prompt_tokens) - 1) // granule * granule)

    # -- each step: the budget, and who sits it out -----------------------------------------

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        if not self.options.hits_first:
            return self._timed(super().schedule(*args, **kwargs))  # type: ignore[misc]
        # vLLM gives the budget to running requests in the order they were admitted: a cold
        # prompt admitted first would take it from a hit admitted after it, whose prefill did
        # not fit its first step. By rank instead.
        self.running.sort(key=lambda r: (r.priority, r.arrival_time))
        best = self._best_waiting()
        held = self._sitting_out(best)
        answering = self._answer_soon()
        if held or answering:
            self._calm = 0  # someone's first token waits for this step: a short one
        budget = self._budget(answering)
        active = self.max_num_active_reqs
        if held:
            self.running = [r for r in self.running if r not in held]
            self.max_num_active_reqs -= len(held)  # they keep their slots
        if self._gathering():
            budget = 0  # an empty step: vLLM's engine loop comes back within a millisecond
        self.max_num_scheduled_tokens = budget
        try:
            output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.max_num_scheduled_tokens, self.max_num_active_reqs = self._full_budget, active
            self.running.extend(held)
        spare = output.total_num_scheduled_tokens < budget
        if held and best is not None and best.status in READY and spare:
            # The step had tokens to spare and it still found no room (most often no free
            # blocks: the prefills that sat out hold them). Sitting out for it again would
            # stall them forever; they go on until it is in, and sit out again for whoever
            # ranks first after it. (With no tokens to spare, requests running ahead of it
            # took the step: its turn comes.)
            self._stalled_on = best.request_id
        if output.total_num_scheduled_tokens:
            self._calm += 1
        return self._timed(output)

    def _best_waiting(self) -> Request | None:
        """The first waiting request that could be scheduled now."""
        best: Request | None = None
        for queue in (self.kv_holding_waiting, self.waiting):
            for request in queue:  # in priority order
                loaded = request.request_id in self.finished_recving_kv_req_ids
                if request.status in READY or (
                    request.status == RequestStatus.WAITING_FOR_REMOTE_KVS and loaded
                ):
                    if best is None or request.priority < best.priority:
                        best = request
                    break
        return best

    def _sitting_out(self, best: Request | None) -> list[Request]:
        """Prefills under way that rank behind ``best``: they skip this step."""
        if best is None or best.request_id == self._stalled_on:
            return []
        return [
            r
            for r in self.running
            if r.num_computed_tokens < r.num_prompt_tokens and r.priority > best.priority
        ]

    def _gathering(self) -> bool:
        """Whether an idle engine should wait a moment before its first step: the requests of
        a burst arrive some milliseconds apart, and a hit that arrives just after a cold
        prompt would otherwise wait for its first step, one just after another hit for the
        first hit's step. Under ``kvtier serve`` the API server counts the requests on their
        way (:mod:`kvtier.integrations.front`): the engine waits while any is, at most
        ``gather_s`` after it was given the first; a lone request does not wait. Without
        that count, it waits at most ``gather_s`` and 5% of the step the shortest request
        needs, from their arrival at the API server."""
        if self.running or not self.options.gather_s:
            return False
        now = self.wall()
        first, given, work = None, now, None
        for r in self.waiting:
            if r.status not in READY:
                continue
            w = self._work.get(r.request_id, r.num_prompt_tokens)
            first = r.arrival_time if first is None else min(first, r.arrival_time)
            given = min(given, self._given.get(r.request_id, now))
            work = w if work is None else min(work, w)
        if first is None or work is None:
            return False
        if self.on_the_way is not None:
            if not self.on_the_way.pending():
                return False
            if now - given < self.options.gather_s:
                return True
            self.on_the_way.forget()  # waited long enough: whatever is missing got lost
            return False
        limit = min(self.options.gather_s, GATHER_SHARE * self.model.seconds(work))
        return bool(now - first < limit)

    def _answer_soon(self) -> int:
        """The prefill tokens this step gives the requests that would finish their prefill
        within a short step (0: none): their first tokens wait for the end of the step, which
        must neither grow nor be filled up with another prompt's chunk. How many of them go
        now and how many in the next steps is what makes the sum of the slowdowns least,
        theirs and those behind them (:func:`~kvtier.policy.scheduling.first_answers`)."""
        short = self.model.tokens_within(self.options.step_s)
        works: list[int] = []
        behind: list[int] = []
        decodes = 0
        for r in self.running:  # in rank order (schedule sorted them)
            left = r.num_prompt_tokens - r.num_computed_tokens
            if left <= 0:
                decodes += 1
            elif left <= short:
                works.append(left)
            else:
                behind.append(left)
        for queue in (self.kv_holding_waiting, self.waiting):
            for r in queue:  # in priority order
                # (one loading in the background will be ready at the end of some step)
                ready = r.status in READY or r.status == RequestStatus.WAITING_FOR_REMOTE_KVS
                work = self._work.get(r.request_id, short + 1)
                if ready and work <= short:
                    works.append(work)
                elif ready:
                    behind.append(work)
        return sum(works[: first_answers(works, self.model, behind, decodes)])

    def _budget(self, answering: int) -> int:
        """This step's token budget: what fits in the step's time; or, when requests are
        about to answer, what those that answer in this step need (their split into steps
        weighed the step's length already), not a token more: another prompt's chunk would
        lengthen the step they wait for; plus one token per decode."""
        decodes = sum(1 for r in self.running if r.num_computed_tokens >= r.num_prompt_tokens)
        prefill = self.model.tokens_within(self.options.step_seconds(self._calm))
        if answering:
            prefill = answering
        return max(1, min(int(self._full_budget), prefill + decodes))

    # -- after each step: the step model ----------------------------------------------------

    def _timed(self, output: SchedulerOutput) -> SchedulerOutput:
        self._steps.append((id(output), self.clock()))
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> Any:
        now = self.clock()
        scheduled_at = now
        while self._steps:
            key, at = self._steps.popleft()
            if key == id(scheduler_output):
                scheduled_at = at
                break
        # With async scheduling the next step is scheduled while this one runs: it starts
        # when this one ends.
        started = max(scheduled_at, self._last_done)
        self._last_done = now
        starts = len(scheduler_output.scheduled_new_reqs)  # their prefills begin: hits load
        self.model.observe(scheduler_output.total_num_scheduled_tokens, now - started, starts)
        return super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]


class HitsFirstScheduler(HitsFirst, Scheduler):
    """vLLM's scheduler, hits first."""


class HitsFirstAsyncScheduler(HitsFirst, AsyncScheduler):
    """vLLM's async scheduler (the default where the executor supports it), hits first."""


def scheduler(**kwargs: Any) -> Scheduler:
    """What ``--scheduler-cls`` names: builds the hits-first form of the scheduler vLLM would
    have used (async scheduling or not)."""
    vllm_config: VllmConfig = kwargs["vllm_config"]
    if vllm_config.scheduler_config.async_scheduling:
        return HitsFirstAsyncScheduler(**kwargs)
    return HitsFirstScheduler(**kwargs)
