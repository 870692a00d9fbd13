"""Discrete-event simulation of a plan serving a request trace.

A request's life in the simulation mirrors the real system:

    arrival -> route pick (the router's policy by name, planner.sim.routing;
      cache-aware also reads each group's cached prefix of the prompt)
      -> prefill group FIFO queue -> batched prefill pass (token budget) over
         the tokens its prefix cache does not hold -> prompt blocks cached there
      -> KV transfer over the route's link (FIFO per route; the whole prompt)
      -> decode group waiting queue -> admitted when a batch slot and KV
         cache for prompt + output are free -> continuous batching: each
         step every running request gets one token -> done, KV freed
    decode-first (cache-aware, the decode group holds all but a short suffix):
      arrival -> decode group waiting queue -> its first step also computes the suffix

Prefix caches (planner.spec.prefix_reuse): each group keeps an LRU of the
trace's hash-id blocks it has seen (prefill groups when a pass ends, decode
groups when a request is admitted), sized by its KV capacity, under every
routing. A pass computes the uncached tokens while attending over the cached
ones. Requests without hash ids never hit, so a trace without them runs as
with no caches at all.

TTFT is arrival to the end of the request's first decode step (the client's
first token comes from the decode worker, as through our router); TPOT and
ITL come from the decode steps it was part of. Times are in seconds; the
records are `loadtest.metrics.RequestRecord`s, so `loadtest.report` turns a
simulation into the same result schema as a measured run.

Decode is stepped per group, not per token: a running request is a heap entry
keyed by the step at which it finishes, and the batch's context sum grows by
the batch size each step, so a step costs O(1) plus the requests that finish.

Simplifications (see docs/loadtest.md): KV for a request's whole output is
reserved when it is admitted (no preemption); a pipeline-parallel decode
group runs one batch at a time (its step is the sum of its stages); the
prefix cache is the whole KV capacity, apart from the running requests'
reservation; the KV transfer moves the whole prompt even when the decode
group holds part of it.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from common.cache_routing import DEFAULT_DECODE_FIRST_MAX_TOKENS, DEFAULT_SHARE_SLACK_REQUESTS
from common.roles import Role
from loadtest.metrics import RequestRecord
from loadtest.workload import PlannedRequest
from planner.spec.prefix_reuse import MOONCAKE_BLOCK_TOKENS, PrefixCache, cached_tokens, prompt_blocks
from planner.sim.routing import ROUTINGS, RoutePicker
from planner.sim.types import SimCosts, SimFleet, SimGroup, SimRoute


@dataclass(slots=True)
class SimConfig:
    keep_itls: bool = True  # per-token gaps in the records (memory grows with tokens)
    horizon_s: float | None = None  # stop the clock here; unfinished requests fail as 'timeout'
    # The router's policies by name (planner.sim.routing): "plan" (load-corrected plan weights,
    # smooth WRR; "load_aware" is its old name), "round-robin", "cache-aware", and "weighted"
    # (the plan's weights alone).
    routing: str = "plan"
    load_scale_tokens: float = 4096.0
    # Prefix caches (planner.spec.prefix_reuse): every group keeps the blocks of the prompts it
    # served, whatever the routing (an engine with prefix caching caches anyway).
    prefix_caching: bool = True
    prefix_block_tokens: int = MOONCAKE_BLOCK_TOKENS  # tokens per trace hash id
    share_slack_requests: float = DEFAULT_SHARE_SLACK_REQUESTS  # cache-aware only
    decode_first_max_tokens: int = DEFAULT_DECODE_FIRST_MAX_TOKENS  # cache-aware only; 0: never

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r} is unknown; use one of {ROUTINGS}")
        if self.prefix_block_tokens < 1:
            raise ValueError(f"prefix_block_tokens={self.prefix_block_tokens} must be >= 1 (512 for Mooncake)")
        if self.share_slack_requests < 0 or self.decode_first_max_tokens < 0:
            raise ValueError("share_slack_requests and decode_first_max_tokens must be >= 0")


@dataclass(slots=True)
class PrefixCounters:
    """Prompt work of a run: tokens looked up in the prefix caches and tokens found, per role of the
    group that computed the prompt ("decode" is decode-first: the suffix computed on a decode group)."""

    queries: dict[str, int] = field(default_factory=dict)  # role -> prompt tokens of the passes that ran
    hits: dict[str, int] = field(default_factory=dict)  # role -> of those, tokens the cache held
    decode_first_requests: int = 0

    def add(self, role: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.queries[role] = self.queries.get(role, 0) + prompt_tokens
        self.hits[role] = self.hits.get(role, 0) + cached_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(self.queries.values())

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens computed anywhere (prefill, colocated and decode-first)."""
        return self.prompt_tokens - sum(self.hits.values())

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_json(self) -> dict:
        """The load test's prefix-cache fields (loadtest.prefix_cache: the prefill side is the prefill
        and colocated roles), plus the totals over every group, decode-first included."""
        roles = {role: {"queries": q, "hits": self.hits[role], "hit_rate": self.hits[role] / q if q else None}
                 for role, q in sorted(self.queries.items())}
        side = [roles[r] for r in ("prefill", "colocated") if r in roles]
        queries, hits = sum(s["queries"] for s in side), sum(s["hits"] for s in side)
        return {
            "prefix_cache": roles,
            "prefix_cache_hit_rate": hits / queries if queries else None,
            "prefill_tokens_computed": queries - hits if side else None,
            "prefix_cache_source": "simulation (LRU prefix caches per group, planner.spec.prefix_reuse)",
            "prompt_tokens_computed_all_groups": self.computed_tokens,
            "prefix_hit_rate_all_groups": self.hit_rate,
            "decode_first_requests": self.decode_first_requests,
        }


@dataclass(slots=True)
class _Req:
    rec: RequestRecord
    route: SimRoute
    blocks: tuple = ()  # the prompt's hash-id blocks
    decode_first: bool = False
    compute_tokens: int = 0  # prompt tokens the group computes (uncached), set when its pass starts
    compute_sq: int = 0  # their attention term: (cached + computed)^2 - cached^2
    start_step: int = 0
    finish_step: int = 0
    first_token_s: float = 0.0  # when its prompt, computed in a mixed step, has gone through every stage


@dataclass(slots=True)
class _DecodeState:
    group: SimGroup
    cache: PrefixCache
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)  # heap of (finish_step, seq, _Req)
    step: int = 0
    step_ends_s: list = field(default_factory=lambda: [0.0])  # end time of step k at index k
    sum_context: int = 0
    kv_used: int = 0
    busy: bool = False


@dataclass(slots=True)
class _PrefillState:
    group: SimGroup
    cache: PrefixCache
    queue: deque = field(default_factory=deque)
    busy: bool = False


class Simulation:
    def __init__(self, fleet: SimFleet, costs: SimCosts, cfg: SimConfig | None = None) -> None:
        self.fleet = fleet
        self.costs = costs
        self.cfg = cfg or SimConfig()
        self.prefill = {g.name: _PrefillState(g, self.prefix_cache(g)) for g in fleet.groups if g.role == Role.PREFILL}
        self.decode = {g.name: _DecodeState(g, self.prefix_cache(g)) for g in fleet.groups if g.role.serves_decode}
        self.link_free_s = {(r.prefill, r.decode): 0.0 for r in fleet.routes}
        self.picker = RoutePicker(fleet.routes, self.cfg.routing, self.cfg.load_scale_tokens,
                                  self.cfg.share_slack_requests, self.cfg.decode_first_max_tokens)
        # Tokens (prompt + output) of requests routed to a group and not yet done there.
        self.outstanding = {g.name: 0 for g in fleet.groups}
        self.counters = PrefixCounters()
        self.events: list = []
        self.seq = 0
        self.now = 0.0

    def prefix_cache(self, group: SimGroup) -> PrefixCache:
        """A group's prefix cache: its KV capacity in blocks (none without prefix caching)."""
        blocks = group.kv_capacity_tokens // self.cfg.prefix_block_tokens if self.cfg.prefix_caching else 0
        return PrefixCache(blocks)

    def _at(self, t: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, args))

    def run(self, requests: list[PlannedRequest]) -> list[RequestRecord]:
        records = []
        for r in requests:
            rec = RequestRecord(r.index, r.arrival_s, r.input_tokens, r.output_tokens, start_s=r.arrival_s)
            records.append(rec)
            blocks = tuple(prompt_blocks(r.hash_ids, r.input_tokens, self.cfg.prefix_block_tokens))
            self._at(r.arrival_s, self._arrive, rec, blocks)
        horizon = self.cfg.horizon_s
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            if horizon is not None and t > horizon:
                break
            self.now = t
            fn(*args)
        for rec in records:
            if not rec.success and rec.error_kind is None:
                rec.error_kind, rec.error = "timeout", "not finished when the simulation clock stopped"
        return records

    # -- prefix caches -----------------------------------------------------
    def _cache(self, group: str) -> PrefixCache:
        st = self.prefill.get(group) or self.decode[group]
        return st.cache

    def _cached_tokens(self, group: str, req_blocks: tuple, input_tokens: int) -> int:
        n = self._cache(group).match_blocks(req_blocks) if req_blocks else 0
        return cached_tokens(n, input_tokens, self.cfg.prefix_block_tokens)

    def _set_prompt_work(self, req: _Req, group: str) -> None:
        """The prompt work `group` does for `req` if its pass starts now: the tokens its cache does not
        hold, attending over the cached ones too (the cost model's attention term is the token pairs:
        (cached + computed)^2 - cached^2)."""
        inp = req.rec.input_tokens
        hit = self._cached_tokens(group, req.blocks, inp)
        req.compute_tokens = inp - hit
        req.compute_sq = inp * inp - hit * hit

    def _count_prompt_work(self, req: _Req, role: Role) -> None:
        inp = req.rec.input_tokens
        self.counters.add(role.value, inp, inp - req.compute_tokens)

    # -- prefill ---------------------------------------------------------
    def _arrive(self, rec: RequestRecord, blocks: tuple) -> None:
        cached = None
        if self.picker.wants_prefixes and blocks:
            cached = {g: self._cached_tokens(g, blocks, rec.input_tokens) for g in self.picker.groups}
        pick = self.picker.pick(self.outstanding, rec.input_tokens, cached)
        route = pick.route
        rec.route = f"{route.prefill}->{route.decode}"
        tokens = rec.input_tokens + rec.output_tokens_requested
        capacity = self.decode[route.decode].group.kv_capacity_tokens
        if tokens > capacity:
            rec.error_kind = "kv_capacity"
            rec.error = f"needs {tokens} KV tokens; decode group {route.decode} holds {capacity}"
            return
        self.outstanding[route.decode] += tokens
        req = _Req(rec, route, blocks, decode_first=pick.decode_first)
        if route.prefill == route.decode or pick.decode_first:  # the decode group computes the prompt
            self.counters.decode_first_requests += pick.decode_first
            self._kv_arrived(req)
            return
        self.outstanding[route.prefill] += tokens
        st = self.prefill[route.prefill]
        st.queue.append(req)
        if not st.busy:
            self._start_prefill(st)

    def _start_prefill(self, st: _PrefillState) -> None:
        if not st.queue:
            st.busy = False
            return
        name = st.group.name
        batch = [st.queue.popleft()]
        self._set_prompt_work(batch[0], name)
        tokens = batch[0].compute_tokens
        while st.queue:
            req = st.queue[0]
            self._set_prompt_work(req, name)
            if tokens + req.compute_tokens > st.group.max_prefill_tokens:
                break
            st.queue.popleft()
            tokens += req.compute_tokens
            batch.append(req)
        for req in batch:
            self._count_prompt_work(req, Role.PREFILL)
        sq = sum(r.compute_sq for r in batch)
        latency_s, busy_s = self.costs.prefill_batch_s(st.group, tokens, sq, own_step=True)
        st.busy = True
        self._at(self.now + latency_s, self._prefill_done, batch)
        self._at(self.now + busy_s, self._start_prefill, st)

    def _prefill_done(self, batch: list[_Req]) -> None:
        for req in batch:
            self.prefill[req.route.prefill].cache.insert(req.blocks)
            self.outstanding[req.route.prefill] -= req.rec.input_tokens + req.rec.output_tokens_requested
            key = (req.route.prefill, req.route.decode)
            start = max(self.now, self.link_free_s[key])
            # The whole prompt's KV crosses, even what the decode group may already hold.
            done = start + req.route.kv_latency_s + req.route.kv_seconds_per_token * req.rec.input_tokens
            self.link_free_s[key] = done
            self._at(done, self._kv_arrived, req)

    # -- decode ----------------------------------------------------------
    def _kv_arrived(self, req: _Req) -> None:
        st = self.decode[req.route.decode]
        st.waiting.append(req)
        if not st.busy:
            self._start_step(st)

    def _start_step(self, st: _DecodeState) -> None:
        g = st.group
        colocated = g.role == Role.COLOCATED
        old_batch, old_context = len(st.running), st.sum_context + len(st.running)
        new_tokens = new_sq = 0
        joined: list[_Req] = []  # admitted with their prompt computed in this step
        while st.waiting and len(st.running) < g.max_batch_size:
            req = st.waiting[0]
            need = req.rec.input_tokens + req.rec.output_tokens_requested
            if st.kv_used + need > g.kv_capacity_tokens:
                break
            computes = colocated or req.decode_first  # its prompt runs here, not on a prefill group
            if computes:
                self._set_prompt_work(req, g.name)
                if new_tokens and new_tokens + req.compute_tokens > g.max_prefill_tokens:
                    break
                self._count_prompt_work(req, g.role)
                new_tokens += req.compute_tokens
                new_sq += req.compute_sq
                joined.append(req)
            st.waiting.popleft()
            st.cache.insert(req.blocks)  # its prompt's KV is now in this group's cache
            st.kv_used += need
            st.sum_context += req.rec.input_tokens
            req.start_step = st.step + 1
            req.finish_step = st.step + req.rec.output_tokens_requested
            self.seq += 1
            heapq.heappush(st.running, (req.finish_step, self.seq, req))
        if not st.running:
            st.busy = False
            return
        st.busy = True
        batch = len(st.running)
        st.sum_context += batch  # each running request attends over one more token
        if new_tokens:
            # vLLM's mixed step: the new prompts' prefill (which yields their first token) plus one
            # decode token for the requests already running. A decode group runs it for a
            # decode-first request (the uncached suffix only), a colocated group for every request.
            latency_s, busy_s = self.costs.prefill_batch_s(g, new_tokens, new_sq)
            step_s = latency_s
            if old_batch:
                # The running requests wait for the prompt work each stage does (busy), not for the
                # prompt's trip through every stage: with pipeline stages vLLM keeps one batch in
                # flight per stage, so the others' tokens flow while the prompt's batch moves on.
                # The new requests' first token still takes the whole trip (latency).
                step_s = busy_s + self.costs.decode_step_s(g, old_batch, old_context)
                for req in joined:
                    req.first_token_s = self.now + latency_s
        else:
            step_s = self.costs.decode_step_s(g, batch, st.sum_context)
        self._at(self.now + step_s, self._end_step, st)

    def _end_step(self, st: _DecodeState) -> None:
        st.step += 1
        st.step_ends_s.append(self.now)
        while st.running and st.running[0][0] == st.step:
            _, _, req = heapq.heappop(st.running)
            self._finish(st, req)
        self._start_step(st)

    def _finish(self, st: _DecodeState, req: _Req) -> None:
        rec = req.rec
        ends = st.step_ends_s
        rec.ttft_s = max(ends[req.start_step], req.first_token_s) - rec.start_s
        rec.latency_s = ends[req.finish_step] - rec.start_s
        rec.output_tokens = rec.output_tokens_requested
        if self.cfg.keep_itls:
            rec.itls_s = [ends[k] - ends[k - 1] for k in range(req.start_step + 1, req.finish_step + 1)]
        rec.success = True
        st.kv_used -= rec.input_tokens + rec.output_tokens_requested
        self.outstanding[st.group.name] -= rec.input_tokens + rec.output_tokens_requested
        st.sum_context -= rec.input_tokens + rec.output_tokens_requested


def simulate(
    fleet: SimFleet, requests: list[PlannedRequest], costs: SimCosts, cfg: SimConfig | None = None
) -> list[RequestRecord]:
    """Records of every request (failed ones carry `error_kind`)."""
    return Simulation(fleet, costs, cfg).run(requests)


def simulate_with_counters(
    fleet: SimFleet, requests: list[PlannedRequest], costs: SimCosts, cfg: SimConfig | None = None
) -> tuple[list[RequestRecord], PrefixCounters]:
    """Records and the run's prompt work (tokens computed, prefix hit rate, decode-first count)."""
    sim = Simulation(fleet, costs, cfg)
    return sim.run(requests), sim.counters
