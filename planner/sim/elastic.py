"""The simulator with the control loop running on its clock: the same `Controller` as online.

    every policy.interval_s of simulated time (until the last arrival):
        observed = the requests that arrived over the last window_s
        decision = Controller.step(observed, healthy groups, now)       planner.core.replan
        "apply" -> the plan's roles and route weights take effect at once: the
                   picker is rebuilt, a flipped group keeps serving what it
                   already holds in its old role (the drain) and takes new
                   work in its new one, with its prefix cache
    at a failure time: the group's worker is lost. What it held fails
        ("worker_lost"); the router stops routing to it (static or not, as
        the router does by health); the controller sees it unhealthy.
    at a join time: the fleet lists more GPUs (the controller's
        update_fleet). A new group the controller starts on them (or on the
        GPUs of running groups it restarts in other shapes) loads for
        `startup_s`; the plan's roles and routes take effect when the new
        groups serve, and a retired group finishes what it holds.

A static run is this without the controller (`policy=None`), so that a static
and an elastic plan see the same failures and the same routing. Simplifications
beyond the simulator's: an action costs nothing but the flip charge the
controller itself counts (a real flip drains in seconds); requests a lost
worker held fail instead of being retried or migrated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.plan import Plan
from common.roles import Role
from loadtest.metrics import RequestRecord
from loadtest.workload import PlannedRequest
from planner.core.observed import ObservedWorkload
from planner.core.replan import ControlPolicy, Controller, Decision
from planner.sim.from_plan import fleet_from_plan
from planner.sim.routing import RoutePicker
from planner.sim.simulator import Simulation, SimConfig, _DecodeState, _PrefillState
from planner.sim.types import SimCosts, SimRoute
from planner.spec.cluster import Cluster

DEFAULT_WINDOW_S = 60.0
DEFAULT_STARTUP_S = 60.0  # a new group's worker, from start to serving (model load on a GPU)


@dataclass(slots=True)
class ElasticRun:
    records: list[RequestRecord]
    decisions: list[Decision] = field(default_factory=list)  # every decision taken ("none" ones too)

    @property
    def actions(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "apply"]


class ElasticSimulation(Simulation):
    """A simulation whose groups can flip roles, lose their worker, and take new route weights."""

    def __init__(self, cluster: Cluster, plan: Plan, costs: SimCosts, cfg: SimConfig | None = None,
                 startup_s: float = DEFAULT_STARTUP_S) -> None:
        self.cluster = cluster
        super().__init__(fleet_from_plan(plan, cluster), costs, cfg)
        self.startup_s = startup_s
        self.starting: set[str] = set()  # new groups whose worker is still loading
        self._pending = None  # the plan that takes effect once the starting groups serve
        self._routes: list[SimRoute] = list(self.fleet.routes)  # the applied plan's, before health
        # Every prefill or decode group can take either role: it gets both states, on one prefix cache.
        for g in self.fleet.groups:
            if g.role is Role.PREFILL:
                self.decode[g.name] = _DecodeState(g, self.prefill[g.name].cache)
            elif g.role is Role.DECODE:
                self.prefill[g.name] = _PrefillState(g, self.decode[g.name].cache)
        self.lost: set[str] = set()
        self.arrivals: deque[tuple[float, int, int]] = deque()  # (arrival s, prompt, output) for the window

    def apply(self, plan: Plan) -> None:
        """The plan's roles and weights (groups it leaves out get no new work): now, or, when it starts
        new groups, once they serve (the router starts new workers before the change's routes and roles
        take effect, so a restarted group serves in its old shape until its successors do)."""
        fleet = fleet_from_plan(plan, self.cluster)
        for g in fleet.groups:
            if g.name not in self.prefill:
                self._start(g)
        if self.starting:
            self._pending = fleet
            return
        self._switch(fleet)

    def _switch(self, fleet) -> None:
        self._pending = None
        for g in fleet.groups:
            self.prefill[g.name].group = g
            self.decode[g.name].group = g
        self._routes = list(fleet.routes)
        self._set_routes(self._routes)

    def _start(self, group) -> None:
        """A new group: its worker loads for startup_s, then takes work in either role, as the others."""
        cache = self.prefix_cache(group)
        self.prefill[group.name] = _PrefillState(group, cache)
        self.decode[group.name] = _DecodeState(group, cache)
        self.outstanding[group.name] = 0
        self.starting.add(group.name)
        self._at(self.now + self.startup_s, self._started, group.name)

    def _started(self, name: str) -> None:
        self.starting.discard(name)
        if not self.starting and self._pending is not None:
            self._switch(self._pending)

    def _set_routes(self, routes: list[SimRoute]) -> None:
        down = self.lost | self.starting
        live = [r for r in routes if r.prefill not in down and r.decode not in down]
        cfg = self.cfg
        self.picker = RoutePicker(live, cfg.routing, cfg.load_scale_tokens, cfg.share_slack_requests,
                                  cfg.decode_first_max_tokens)
        for r in live:
            self.link_free_s.setdefault((r.prefill, r.decode), 0.0)

    def lose(self, name: str) -> None:
        """`name`'s worker dies now: what it holds fails, and no route reaches it any more."""
        self.lost.add(name)
        self._set_routes(self._routes)
        why = f"the worker of group {name} was lost"
        for req in self.prefill[name].queue:  # counted on both ends until its prefill is done
            self._fail(req, why, (req.route.prefill, req.route.decode))
        for req in list(self.decode[name].waiting) + [req for _, _, req in self.decode[name].running]:
            self._fail(req, why, (req.route.decode,))
        self.prefill[name].queue.clear()
        self.decode[name].waiting.clear()
        self.decode[name].running.clear()

    def _fail(self, req, why: str, counted_on: tuple[str, ...]) -> None:
        """`req` ends with an error; the groups whose outstanding tokens still count it let it go."""
        rec = req.rec
        rec.error_kind, rec.error = "worker_lost", why
        for group in dict.fromkeys(counted_on):
            self.outstanding[group] -= rec.input_tokens + rec.output_tokens_requested

    # A lost group's events still in the queue end the requests they carry.
    def _prefill_done(self, batch) -> None:
        alive = [req for req in batch if req.route.prefill not in self.lost and req.route.decode not in self.lost]
        for req in batch:
            if req not in alive:
                self._fail(req, "the worker of its route was lost", (req.route.prefill, req.route.decode))
        super()._prefill_done(alive)

    def _kv_arrived(self, req) -> None:
        if req.route.decode in self.lost:
            self._fail(req, f"the worker of group {req.route.decode} was lost", (req.route.decode,))
            return
        super()._kv_arrived(req)

    def _start_step(self, st: _DecodeState) -> None:
        if st.group.name in self.lost:
            st.busy = False
            return
        super()._start_step(st)

    def _start_prefill(self, st: _PrefillState) -> None:
        if st.group.name in self.lost:
            st.busy = False
            return
        super()._start_prefill(st)

    def _arrive(self, rec: RequestRecord, blocks: tuple) -> None:
        self.arrivals.append((self.now, rec.input_tokens, rec.output_tokens_requested))
        if not self.picker.routes:
            rec.error_kind, rec.error = "no_route", "no route with a live worker at each end"
            return
        super()._arrive(rec, blocks)

    def observed(self, window_s: float) -> ObservedWorkload | None:
        while self.arrivals and self.arrivals[0][0] < self.now - window_s:
            self.arrivals.popleft()
        span = min(window_s, self.now) or window_s
        return ObservedWorkload.of_requests([(p, o) for _, p, o in self.arrivals], span,
                                            [t for t, _, _ in self.arrivals])


def simulate_elastic(cluster: Cluster, plan: Plan, requests: list[PlannedRequest], costs: SimCosts,
                     cfg: SimConfig | None = None, policy: ControlPolicy | None = None,
                     failures: list[tuple[float, str]] = (), window_s: float = DEFAULT_WINDOW_S,
                     joins: list[tuple[float, Cluster]] = (), startup_s: float = DEFAULT_STARTUP_S) -> ElasticRun:
    """Serve `requests` from `plan`; with a policy, the controller re-plans on the simulated clock
    (None: the static plan, with the same failures and joins). `failures`: (time s, group id) of lost
    workers; `joins`: (time s, the fleet from then on) when GPUs join."""
    sim = ElasticSimulation(cluster, plan, costs, cfg, startup_s)
    run = ElasticRun([])
    for at_s, group in failures:
        if group not in sim.prefill and group not in sim.decode:
            raise ValueError(f"failure of group {group!r}: the plan has no such prefill or decode group")
        sim._at(at_s, sim.lose, group)
    controller = Controller(cluster, plan, policy) if policy is not None else None

    def join(fleet: Cluster) -> None:
        sim.cluster = fleet
        if controller is not None:
            controller.update_fleet(fleet)

    for at_s, fleet in joins:
        sim._at(at_s, join, fleet)
    if controller is not None:
        end_s = max((r.arrival_s for r in requests), default=0.0)

        def tick() -> None:
            healthy = {g for g in controller.roles if g not in sim.lost and g not in sim.starting}
            decision = controller.step(sim.observed(window_s), healthy, sim.now)
            run.decisions.append(decision)
            if decision.action == "apply":
                sim.apply(decision.plan)
                controller.applied(decision)
            if sim.now + policy.interval_s <= end_s:
                sim._at(sim.now + policy.interval_s, tick)

        sim._at(policy.interval_s, tick)
    run.records = sim.run(requests)
    return run
