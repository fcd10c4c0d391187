"""The connector's scheduler side: how much of each prompt kvtier holds, and what the worker
loads and saves at each step.

:meth:`SchedulerSide.matched` asks the store how many leading prompt tokens it holds (whole
chunks, then a tail of 16-token granules, leaving at least one token to compute) and decides whether
the load runs in the background (the request then waits in WAITING_FOR_REMOTE_KVS while other
requests run). :meth:`SchedulerSide.step` turns vLLM's scheduler output into this step's
:class:`~.messages.KvtierConnectorMetadata`: the chunks to load into each request's blocks, its
newly completed prompt chunks to save and, once a prompt is computed, its tail (its tokens after
its last full chunk, cut to a multiple of 16: a returning turn recomputes at most 15 of them,
where vLLM's own cache recomputes up to a block, 128 tokens on CPU), and prefetches
for the requests still waiting for blocks. Saves are planned only in steps with no prefill in
them (the gather runs after the forward pass, and nobody's first token should wait for it), or
when the request ends (:meth:`SchedulerSide.finished`), when the tokens it generated are saved
too: a chat's next turn holds the answer in its prompt, and the decode computed its KV.

Everything kvtier knows of a request lives in one :class:`RequestState`, dropped in one place
when the request finishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kvtier.config import DiskTierConfig, MemoryTierConfig
from kvtier.integrations.vllm.accounts import ConnectorMetrics, RequestAccount
from kvtier.integrations.vllm.context import ConnectorContext
from kvtier.integrations.vllm.messages import (
    KvtierConnectorMetadata,
    KvtierWorkerMetadata,
    LoadSpec,
    SaveSpec,
)
from kvtier.integrations.vllm.metrics import RATE_FILE
from kvtier.integrations.vllm.worker import hand_over_pending
from kvtier.keys import ChunkKey, tail_candidates
from kvtier.results import LookupResult
from kvtier.store import TieredStore
from kvtier.tenants import salt_tenant

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


# How long a lookup waits (asking vLLM to ask again) for a finished request's saves that
# would extend its hit: they are gathered at the next step, so this is only a bound.
UNSAVED_WAIT_S = 2.0


class Saves(Protocol):
    """A worker's saves, as the scheduler side may wait for them in the same process."""

    def saving(self) -> bool: ...

    def wait(self, keys: Sequence[ChunkKey] | None = None) -> None: ...


@dataclass
class RequestState:
    """What the scheduler side knows of one request, from its arrival to its end."""

    prompt: list[int]
    salt: str | None
    held: int = 0  # leading prompt tokens the last lookup found in kvtier
    vllm_hit: int = 0  # tokens vLLM's own prefix cache had at that lookup
    background: bool = False  # the load being planned runs in the background
    load: tuple[int, int] | None = None  # prompt tokens [start, end) to load at this step
    prefetch: bool = False  # waits for blocks: the worker warms its DRAM meanwhile
    block_ids: list[int] | None = None  # its blocks, once scheduled
    saved_tokens: int = 0  # prompt tokens already in kvtier (held, loaded or saved; a tail too)

    def take_held(self) -> int:
        """The lookup's hit, once: a later scheduling without a new lookup holds nothing."""
        held, self.held = self.held, 0
        return held


class SchedulerSide:
    """The connector's scheduler-side calls, for :class:`~.connector.KvtierConnector`.

    ``in_process_saves`` lists the savers of worker sides running in this process (vLLM's
    one-process layout): a lookup waits for the saves it may find, and needs no mirror of the
    worker's DRAM, since the store it asks is the worker's own.
    """

    def __init__(self, ctx: ConnectorContext, in_process_saves: Callable[[], Sequence[Saves]]):
        self.ctx = ctx
        self._in_process_saves = in_process_saves
        disk = next((t for t in ctx.config.tiers if isinstance(t, DiskTierConfig)), None)
        self.metrics = ConnectorMetrics(Path(disk.path) / RATE_FILE if disk else None)
        self.requests: dict[str, RequestState] = {}
        self.loading: set[str] = set()  # background loads the worker has not reported done
        self._background_loads: list[LoadSpec] = []  # planned, for the next step's metadata
        self._final_saves: list[SaveSpec] = []  # finished requests' saves, for the next step
        # ...until the worker has gathered them (when they were planned, the saves)
        self._unsaved: dict[str, tuple[float, list[SaveSpec]]] = {}
        self.clock: Callable[[], float] = time.monotonic  # tests drive a simulated one
        self._release: set[str] = set()  # ...and those gathered by flush_all, for vLLM to free
        hand_over_pending(self.take_pending)
        self.worker_top: set[bytes] = set()  # mirror of the worker's DRAM tier

    def _state(self, request: Request) -> RequestState:
        state = self.requests.get(request.request_id)
        if state is None:
            state = RequestState(list(request.prompt_token_ids or []), request.cache_salt)
            self.requests[request.request_id] = state
        state.salt = request.cache_salt
        return state

    def arrived(self, request: Request) -> None:
        state = self._state(request)
        state.prefetch = len(state.prompt) > self.ctx.chunk

    def worker_reported(self, output: KVConnectorOutput) -> None:
        self.loading.difference_update(output.finished_recving or ())
        for req_id in output.finished_sending or ():
            self._unsaved.pop(req_id, None)
        meta = output.kv_connector_worker_meta
        if isinstance(meta, KvtierWorkerMetadata):
            self.worker_top.difference_update(meta.dropped)
            self.worker_top.update(meta.stored)
            self.metrics.reported(meta.loads)
        self.metrics.tick()

    def _lookup(self, tokens: list[int], salt: str | None) -> LookupResult:
        """Leading tokens held by kvtier (whole chunks, then a tail): in this process's tiers or
        the worker's DRAM."""
        ctx = self.ctx
        namespace = ctx.namespace(salt)
        savers = self._in_process_saves()
        # A save still under way may hold this very prefix (or a tail of it). The probe (a
        # tail key after every chunk: 1.5 ms at 5,000 tokens) is made only while one is.
        if any(saver.saving() for saver in savers):
            keys = ctx.store.keys(tokens, namespace)
            args = (tokens, namespace, ctx.chunk, ctx.granule, keys)
            probe = keys + [k for n in range(len(keys) + 1) for _, k in tail_candidates(*args, n)]
            for saver in savers:
                saver.wait(probe)
        elsewhere = frozenset() if savers else self.worker_top
        return ctx.store.lookup(tokens, namespace, elsewhere, ctx.granule)

    def _in_dram(self, found: LookupResult, start: int, end: int) -> bool:
        """Whether the hit chunks covering tokens [start, end) are all in the worker's DRAM."""
        top = self.ctx.config.tiers[0]
        dram = top.name if isinstance(top, MemoryTierConfig) else None
        chunk = self.ctx.chunk
        wanted = list(zip(found.keys, found.tiers, strict=False))[start // chunk : -(-end // chunk)]
        # The scheduler's own store names the first tier it finds a chunk in (disk, say),
        # though the worker may hold it in DRAM too: the mirror of the worker's DRAM decides.
        return all(tier in (dram, "elsewhere") or key in self.worker_top for key, tier in wanted)

    def held_tokens(self, request: Request) -> int:
        """Leading prompt tokens kvtier holds for ``request`` now (the hits-first scheduler's
        estimate of its work; loading is decided later, in :meth:`matched`)."""
        state = self._state(request)
        return self._lookup(state.prompt, state.salt).hit_tokens

    def take_pending(self) -> tuple[TieredStore, list[SaveSpec]]:
        """The saves finished requests left for the next step, for a worker in this process
        to gather now (:func:`~.worker.flush_all`); the next step still tells the worker to
        report their requests, so that vLLM frees their blocks."""
        specs, self._final_saves = self._final_saves, []
        for spec in specs:
            self._release.add(spec.req_id)
            self._unsaved.pop(spec.req_id, None)  # gathered: the saver's own wait covers it
        return self.ctx.store, specs

    def _saving_more(self, state: RequestState, hit: int) -> bool:
        """Whether a finished request's saves not gathered yet hold more of this prompt than
        the ``hit`` kvtier holds now (the same prompt sent again as soon as its answer came)."""
        more = min(len(state.prompt) - 1, hit + self.ctx.granule)
        return more > hit and any(
            spec.salt == state.salt
            and len(spec.tokens) >= more
            and spec.tokens[:more] == state.prompt[:more]
            for since, specs in self._unsaved.values()
            if self.clock() - since < UNSAVED_WAIT_S  # a save that never comes must not block
            for spec in specs
        )

    def matched(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's ``get_num_new_matched_tokens``: tokens kvtier can load beyond vLLM's own
        prefix hit, and whether the load runs in the background."""
        req_id = request.request_id
        state = self._state(request)
        found = self._lookup(state.prompt, state.salt)
        if self._saving_more(state, found.hit_tokens):
            return None, False  # vLLM asks again at the next step, when they are saved
        state.held = found.hit_tokens  # those chunks need no saving
        state.vllm_hit = num_computed_tokens
        # vLLM must compute at least the last prompt token itself. A load ends on a tail
        # granule (16 tokens), in the middle of a block if need be: vLLM computes the rest.
        granule = self.ctx.granule
        usable = min(found.hit_tokens, (len(state.prompt) - 1) // granule * granule)
        planned = max(usable - num_computed_tokens, 0)
        tenant = salt_tenant(state.salt)  # None without --tenants
        self.metrics.looked_up(
            RequestAccount(req_id, len(state.prompt), num_computed_tokens, planned, tenant)
        )
        state.background = False
        if usable <= num_computed_tokens:
            return 0, False
        # While other requests run, a load from disk or Redis runs in the background, so
        # that their streams do not stall for it. A DRAM hit, or a load with no one else to
        # stall, runs before the forward pass: it is faster there (all cores, no round trip
        # through WAITING_FOR_REMOTE_KVS).
        loads = self.ctx.options.loads
        others = any(
            r != req_id and s.block_ids is not None for r, s in self.requests.items()
        ) or any(r != req_id for r in self.loading)
        state.background = loads == "async" or (
            loads == "auto" and others and not self._in_dram(found, num_computed_tokens, usable)
        )
        return planned, state.background

    def allocated(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM's ``update_state_after_alloc``: the blocks the planned load goes into."""
        state = self._state(request)
        vllm_hit, state.vllm_hit = state.vllm_hit, 0
        if num_external_tokens <= 0:
            return
        span = (vllm_hit, vllm_hit + num_external_tokens)
        if not state.background:
            state.load = span  # planned with the step's metadata
            return
        # vLLM now holds the request in WAITING_FOR_REMOTE_KVS, out of the scheduled ones
        # until the worker reports the load done: plan the load with the blocks just given.
        state.background = False
        state.prefetch = False  # the load reads it already
        spec = self._load_spec(request.request_id, state, state.held, block_ids, span)
        spec.background = True
        self._background_loads.append(spec)
        self.loading.add(request.request_id)

    def step(self, output: SchedulerOutput) -> KvtierConnectorMetadata:
        """vLLM's ``build_connector_meta``: this step's loads, saves and prefetches."""
        self.metrics.rate.step(output.total_num_scheduled_tokens)
        meta = KvtierConnectorMetadata(loads=self._background_loads, saves=self._final_saves)
        meta.releases = sorted(self._release | {spec.req_id for spec in self._final_saves})
        self._background_loads, self._final_saves, self._release = [], [], set()
        scheduled = output.num_scheduled_tokens
        cached = output.scheduled_cached_reqs
        # Saves gather blocks after the forward pass, on the engine's thread: in a step where
        # some prompt is being computed, someone's first token (or the next chunk of their
        # prompt) waits for them. So they wait for a step with no prefill in it, or for the
        # request's end (finished: vLLM keeps its blocks until they are gathered); unless
        # the chunks must be everywhere before the answer leaves (write-through: a
        # disaggregated prefill engine's).
        defer = not self.ctx.options.write_through and self._prefilling(output)

        def save(req_id: str, state: RequestState, computed: int) -> None:
            if not defer:
                self._plan_save(meta, req_id, state, computed)

        for new in output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:  # NewRequestData does not carry cache_salt
                state = self.requests[new.req_id] = RequestState(
                    list(new.prompt_token_ids or []), None
                )
            state.block_ids = list(new.block_ids[0])
            state.saved_tokens = state.take_held()
            state.prefetch = False  # it loads right now: a prefetch would read it twice
            self._plan_load(meta, new.req_id, state)
            save(new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None or state.block_ids is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted and back: all blocks are new
                state.block_ids = list(new_blocks[0]) if new_blocks else []
                state.saved_tokens = state.take_held()
                self._plan_load(meta, req_id, state)
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            save(req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        # Requests that arrived but were not scheduled wait for blocks: have the worker warm
        # its DRAM from slower tiers meanwhile (once per request).
        for state in self.requests.values():
            state.load = None
            if state.prefetch:
                meta.prefetches.append((state.prompt, state.salt))
                state.prefetch = False
        return meta

    def _prefilling(self, output: SchedulerOutput) -> bool:
        """Whether the step computes some prompt tokens (not only decodes)."""
        cached = output.scheduled_cached_reqs
        return any(
            n.num_computed_tokens < len(n.prompt_token_ids or ()) for n in output.scheduled_new_reqs
        ) or any(
            (state := self.requests.get(r)) is not None and computed < len(state.prompt)
            for r, computed in zip(cached.req_ids, cached.num_computed_tokens, strict=False)
        )

    def _plan_load(self, meta: KvtierConnectorMetadata, req_id: str, state: RequestState) -> None:
        if state.load is not None and state.block_ids is not None:
            meta.loads.append(
                self._load_spec(req_id, state, state.saved_tokens, state.block_ids, state.load)
            )

    def _load_spec(
        self,
        req_id: str,
        state: RequestState,
        held: int,
        block_ids: list[int],
        span: tuple[int, int],
    ) -> LoadSpec:
        """Load ``span`` of the prompt, of which the lookup found ``held`` tokens: whole
        chunks, then maybe a tail."""
        start, end = span
        chunk = self.ctx.chunk
        full = held - held % chunk
        tail = end > full  # only the tail covers `end`
        # The chunk holding `end` is stored whole (or as the tail): it is read whole.
        whole = held if tail else -(-end // chunk) * chunk
        blocks = block_ids[: -(-end // self.ctx.block_size)]  # the last one maybe in part
        return LoadSpec(req_id, state.prompt[:whole], state.salt, blocks, start, end, tail)

    def _plan_save(
        self,
        meta: KvtierConnectorMetadata,
        req_id: str,
        state: RequestState,
        computed: int,
        tokens: list[int] | None = None,
        block_ids: list[int] | None = None,
    ) -> None:
        """Save what ``computed`` completed of ``tokens`` (the prompt unless given), in
        ``block_ids`` (the request's blocks unless given): new whole chunks, then, once all
        of ``tokens`` is computed, its tail."""
        tokens = state.prompt if tokens is None else tokens
        block_ids = state.block_ids if block_ids is None else block_ids
        assert block_ids is not None
        chunk, block = self.ctx.chunk, self.ctx.block_size
        done = min(computed, len(tokens)) // chunk * chunk
        if done > state.saved_tokens:
            first = state.saved_tokens // chunk
            blocks = block_ids[: done // block]
            meta.saves.append(SaveSpec(req_id, tokens[:done], state.salt, blocks, first))
            state.saved_tokens = done
        # Once the whole prompt is computed, its tokens after the last full chunk (to a
        # granule) are saved as a tail: a returning turn that extends the prompt reuses them.
        granule = self.ctx.granule
        end = len(tokens) // granule * granule
        if computed >= len(tokens) and end % chunk and end > state.saved_tokens:
            blocks = block_ids[: -(-end // block)]
            tail = SaveSpec(req_id, tokens[:end], state.salt, blocks, end // chunk, tail=True)
            meta.saves.append(tail)
            state.saved_tokens = end

    def finished(self, request: Request, block_ids: list[int] | None = None) -> bool:
        """vLLM's ``request_finished``: whether vLLM must keep the request's blocks
        (``block_ids``: those of its computed tokens).

        The worker may still be writing into the blocks of a request that ended during its
        background load: they stay its own until the worker reports the load done (vLLM 0.32
        keeps them for a request aborted in WAITING_FOR_REMOTE_KVS anyway). What it computed
        and kvtier does not hold yet (saves that waited; with ``save_outputs``, the tokens it
        generated, where they reach a granule past the prompt) is saved from its blocks at
        the next step: vLLM keeps them until the worker reports them gathered ("done
        sending", in vLLM's terms)."""
        req_id = request.request_id
        state = self.requests.pop(req_id, None)
        self.metrics.finished(req_id)
        if req_id in self.loading:
            return True
        if state is None or state.block_ids is None:
            return False
        everything = list(request.all_token_ids)
        tokens = everything if self.ctx.options.save_outputs else state.prompt
        # The KV of every token but the last sampled one is computed (with async scheduling
        # vLLM may count that one already).
        computed = min(int(request.num_computed_tokens), len(everything) - 1, len(tokens))
        blocks = list(block_ids) if block_ids is not None else state.block_ids
        if -(-computed // self.ctx.block_size) > len(blocks):
            return False  # its blocks are not all known: nothing is saved from them
        plan = KvtierConnectorMetadata()
        prompt = len(state.prompt)
        if computed >= prompt:  # the prompt's own tail first: the same prompt again needs it
            self._plan_save(plan, req_id, state, prompt, state.prompt, blocks)
        self._plan_save(plan, req_id, state, computed, tokens[:computed], blocks)
        if not plan.saves:
            return False
        self._final_saves += plan.saves
        self._unsaved[req_id] = (self.clock(), plan.saves)
        return True
