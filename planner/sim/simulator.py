"""Discrete-event simulation of a plan serving a request trace.

A request's life in the simulation mirrors the real system:

    arrival -> route pick (plan weights divided by the route's outstanding
      tokens, smooth weighted round-robin: the router's policy)
      -> prefill group FIFO queue -> batched prefill pass (token budget)
      -> KV transfer over the route's link (FIFO per route)
      -> decode group waiting queue -> admitted when a batch slot and KV
         cache for prompt + output are free -> continuous batching: each
         step every running request gets one token -> done, KV freed

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
group runs one batch at a time (its step is the sum of its stages).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from common.roles import Role
from common.routing import load_corrected_weight, smooth_wrr_pick, worker_shares
from loadtest.metrics import RequestRecord
from loadtest.workload import PlannedRequest
from planner.sim.types import SimCosts, SimFleet, SimGroup, SimRoute


ROUTINGS = ("load_aware", "weighted")


@dataclass(slots=True)
class SimConfig:
    keep_itls: bool = True  # per-token gaps in the records (memory grows with tokens)
    horizon_s: float | None = None  # stop the clock here; unfinished requests fail as 'timeout'
    # load_aware: the router's policy (common/routing.py): weight / (1 + outstanding
    # tokens on the route's two groups / load_scale_tokens), then smooth WRR.
    # weighted: the plan's weights alone.
    routing: str = "load_aware"
    load_scale_tokens: float = 4096.0

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r} is unknown; use one of {ROUTINGS}")


@dataclass(slots=True)
class _Req:
    rec: RequestRecord
    route: SimRoute
    start_step: int = 0
    finish_step: int = 0


@dataclass(slots=True)
class _DecodeState:
    group: SimGroup
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
    queue: deque = field(default_factory=deque)
    busy: bool = False


class _WeightedRoundRobin:
    """The router's route picker (`common.routing`): smooth weighted round robin over the plan's weights.

    With `load_scale_tokens`, each weight is first corrected for the
    outstanding tokens of the route's groups exactly as our router does
    (`common.routing.load_corrected_weight`). The weights are normalised and a
    route is an index here (the router's `RoutePolicy` keys `Route`s and
    checks worker health, which a simulation does not need).
    """

    def __init__(self, routes: list[SimRoute], load_scale_tokens: float | None = None) -> None:
        self.routes = [r for r in routes if r.weight > 0]
        total = sum(r.weight for r in self.routes)
        self.weights = [r.weight / total for r in self.routes]
        self.current = {i: 0.0 for i in range(len(self.routes))}
        self.scale = load_scale_tokens
        self.shares = worker_shares((r.prefill, r.decode, r.weight) for r in self.routes) if self.routes else {}

    def pick(self, outstanding: dict[str, int]) -> SimRoute:
        if self.scale:
            weights = [load_corrected_weight(w, [(outstanding[g], self.shares[g]) for g in {r.prefill, r.decode}],
                                             self.scale)
                       for w, r in zip(self.weights, self.routes)]
        else:
            weights = self.weights
        return self.routes[smooth_wrr_pick(self.current, dict(enumerate(weights)))]


class Simulation:
    def __init__(self, fleet: SimFleet, costs: SimCosts, cfg: SimConfig | None = None) -> None:
        self.fleet = fleet
        self.costs = costs
        self.cfg = cfg or SimConfig()
        self.prefill = {g.name: _PrefillState(g) for g in fleet.groups if g.role == Role.PREFILL}
        self.decode = {g.name: _DecodeState(g) for g in fleet.groups if g.role.serves_decode}
        self.link_free_s = {(r.prefill, r.decode): 0.0 for r in fleet.routes}
        scale = self.cfg.load_scale_tokens if self.cfg.routing == "load_aware" else None
        self.rr = _WeightedRoundRobin(fleet.routes, scale)
        # Tokens (prompt + output) of requests routed to a group and not yet done there.
        self.outstanding = {g.name: 0 for g in fleet.groups}
        self.events: list = []
        self.seq = 0
        self.now = 0.0

    def _at(self, t: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, args))

    def run(self, requests: list[PlannedRequest]) -> list[RequestRecord]:
        records = []
        for r in requests:
            rec = RequestRecord(r.index, r.arrival_s, r.input_tokens, r.output_tokens, start_s=r.arrival_s)
            records.append(rec)
            self._at(r.arrival_s, self._arrive, rec)
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

    # -- prefill ---------------------------------------------------------
    def _arrive(self, rec: RequestRecord) -> None:
        route = self.rr.pick(self.outstanding)
        rec.route = f"{route.prefill}->{route.decode}"
        tokens = rec.input_tokens + rec.output_tokens_requested
        capacity = self.decode[route.decode].group.kv_capacity_tokens
        if tokens > capacity:
            rec.error_kind = "kv_capacity"
            rec.error = f"needs {tokens} KV tokens; decode group {route.decode} holds {capacity}"
            return
        self.outstanding[route.decode] += tokens
        if route.prefill == route.decode:  # colocated: prefill rides in the decode steps
            self._kv_arrived(_Req(rec, route))
            return
        self.outstanding[route.prefill] += tokens
        st = self.prefill[route.prefill]
        st.queue.append(_Req(rec, route))
        if not st.busy:
            self._start_prefill(st)

    def _start_prefill(self, st: _PrefillState) -> None:
        if not st.queue:
            st.busy = False
            return
        batch = [st.queue.popleft()]
        tokens = batch[0].rec.input_tokens
        while st.queue and tokens + st.queue[0].rec.input_tokens <= st.group.max_prefill_tokens:
            req = st.queue.popleft()
            tokens += req.rec.input_tokens
            batch.append(req)
        sq = sum(r.rec.input_tokens ** 2 for r in batch)
        latency_s, busy_s = self.costs.prefill_batch_s(st.group, tokens, sq)
        st.busy = True
        self._at(self.now + latency_s, self._prefill_done, batch)
        self._at(self.now + busy_s, self._start_prefill, st)

    def _prefill_done(self, batch: list[_Req]) -> None:
        for req in batch:
            self.outstanding[req.route.prefill] -= req.rec.input_tokens + req.rec.output_tokens_requested
            key = (req.route.prefill, req.route.decode)
            start = max(self.now, self.link_free_s[key])
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
        while st.waiting and len(st.running) < g.max_batch_size:
            req = st.waiting[0]
            need = req.rec.input_tokens + req.rec.output_tokens_requested
            if st.kv_used + need > g.kv_capacity_tokens:
                break
            if colocated and new_tokens and new_tokens + req.rec.input_tokens > g.max_prefill_tokens:
                break
            new_tokens += req.rec.input_tokens
            new_sq += req.rec.input_tokens ** 2
            st.waiting.popleft()
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
        if colocated and new_tokens:
            # vLLM's mixed step: the new prompts' prefill (which yields their first
            # token) plus one decode token for the requests already running.
            step_s = self.costs.prefill_batch_s(g, new_tokens, new_sq)[0]
            if old_batch:
                step_s += self.costs.decode_step_s(g, old_batch, old_context)
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
        rec.ttft_s = ends[req.start_step] - rec.start_s
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
