"""The heuristic planner: partition, roles and strategies, max-flow, refinement; and the plan it yields.

    solve(cluster) -> Plan

1. ``partition`` cuts the fleet into groups of several target sizes (one
   replica's memory times 1, 1.5, 2, 3, 4, 6, 8): small groups give more
   replicas, large ones more KV room and lower latency.
2. ``GroupEvaluator`` finds each group's best TP/PP/layer split per role.
3. ``Search.assign_roles`` balances prefill and decode capacity (over the
   whole fleet, and per region for cross-region fleets).
4. ``max_flow`` scores each starting point; the best ones are refined
   (``Search.refine``) until no move raises the flow or the time is up.
5. ``plan_builder.build_plan`` turns the winner into the versioned plan the router reads.

``mode="auto"`` runs the disaggregated and the colocated search and keeps the
one with more throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from common.plan import Plan
from common.roles import Role
from planner.core.budget import choose_gpus
from planner.core.exact import solve_exact
from planner.core.flow import RouteTable
from planner.core.groups import Group
from planner.core.partition import minimal_groups, partition
from planner.core.plan_builder import build_plan
from planner.core.refine import COLOCATED, DISAGGREGATED, Search, State
from planner.core.slo_floor import check_slos_reachable
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster
from planner.spec.errors import InfeasibleFleetError, PlanInputError

MODES = (DISAGGREGATED, COLOCATED, "auto")
GRANULARITIES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
MAX_PER_TYPE_TYPES = 6  # per-type role splits start searches up to this many GPU types (62 splits)
DEFAULT_TIME_LIMIT_S = 25.0


def default_time_limit(cluster: Cluster) -> float:
    """Seconds a solve may take when the caller gives no limit: 0.07 s per GPU, between 4 and 25.

    Most of the refinement's gain comes in its first iterations; this keeps a
    64-GPU fleet under 5 s and a 320-GPU one under 30 s on two cores.
    """
    return min(DEFAULT_TIME_LIMIT_S, max(4.0, 0.07 * cluster.num_gpus))


@dataclass(slots=True)
class SearchOutcome:
    mode: str
    state: State
    value_rps: float
    initial_rps: float
    iterations: int
    flow_evaluations: int


class Planner:
    """Holds the caches shared by every search on one cluster (group strategies, routes)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.evaluator = GroupEvaluator(cluster)
        self.routes = RouteTable(cluster)

    def fleet_memory_bytes(self) -> float:
        """Usable memory of every GPU in the fleet together."""
        return self.evaluator.memory_bytes(tuple((n.index, n.num_gpus) for n in self.cluster.nodes))

    def check_feasible(self) -> None:
        need = self.evaluator.min_replica_bytes()
        have = self.fleet_memory_bytes()
        if have < need:
            gib = (need - have) / 1024**3
            raise InfeasibleFleetError(
                f"the whole fleet has {have / 1024**3:.1f} GiB usable for the model "
                f"(memory_utilization {self.cluster.options.memory_utilization:g}, less activation reserve) but "
                f"{self.cluster.model.name} needs {need / 1024**3:.1f} GiB for its weights and the KV cache of one "
                f"request: {gib:.1f} GiB short",
                shortfall_gib=gib,
            )

    def initial_states(self, search: Search, seed: int) -> list[State]:
        seen: set[tuple] = set()
        states: list[State] = []
        base = self.evaluator.min_replica_bytes()
        for m in GRANULARITIES:
            groups = partition(self.cluster, self.evaluator, base * m, seed=seed)
            key = tuple(sorted(groups))
            if key in seen:
                continue
            seen.add(key)
            states.append(search.assign_roles(groups))
            if search.mode != COLOCATED and len(self.cluster.regions) > 1:
                states.append(self._per_region_roles(search, groups))
            if search.out_of_time():
                break
        return states

    def per_type_states(self, search: Search) -> list[tuple[float, State]]:
        """Minimal groups, each GPU type wholly prefill or decode: every such split, best first.

        Each starts a search of its own: a split's first value says little about where
        its refinement ends (on the mixed fleet benchmark, the two splits that refine
        best start 6th and 9th of 14)."""
        groups = minimal_groups(self.cluster, self.evaluator)
        types = sorted({self.cluster.nodes[g[0][0]].gpu_type for g in groups})
        if len(types) < 2 or len(types) > MAX_PER_TYPE_TYPES:
            state = search.assign_roles(groups)
            return [(search.evaluate(state)[0], state)]
        scored = []
        for mask in range(1, 2 ** len(types) - 1):
            prefill_types = {t for k, t in enumerate(types) if mask >> k & 1}
            roles = [Role.PREFILL if self.cluster.nodes[g[0][0]].gpu_type in prefill_types else Role.DECODE for g in groups]
            state = State(list(groups), roles, {})
            scored.append((search.evaluate(state)[0], mask, state))
        scored.sort(key=lambda t: (-t[0], t[1]))
        return [(value, state) for value, _, state in scored]

    def _per_region_roles(self, search: Search, groups: list[Group]) -> State:
        merged = State([], [], {})
        for region in self.cluster.regions:
            part = [g for g in groups if self.cluster.nodes[g[0][0]].region == region]
            s = search.assign_roles(part)
            merged.groups += s.groups
            merged.roles += s.roles
            for n, c in s.pool.items():
                merged.pool[n] = merged.pool.get(n, 0) + c
        return merged

    def search(self, mode: str, seed: int, deadline: float, starts: int = 4) -> SearchOutcome:
        """Refine the `starts` best partitions, then every per-type split, while time is left."""
        search = Search(self.evaluator, self.routes, mode, seed=seed, deadline=deadline)
        scored = []
        for idx, state in enumerate(self.initial_states(search, seed)):
            value, _ = search.evaluate(state)
            scored.append((value, idx, state))
        scored.sort(key=lambda t: (-t[0], t[1]))
        per_type = self.per_type_states(search) if mode != COLOCATED else []
        candidates = [(value, state) for value, _, state in scored[:starts]] + per_type
        if not candidates:
            return SearchOutcome(mode, State([], [], {}), 0.0, 0.0, search.iterations, search.flow_evaluations)
        initial, best_state = max(candidates, key=lambda t: t[0])
        best_value = initial
        for _, state in candidates:
            if search.out_of_time():
                break
            refined, value = search.refine(state)
            if value > best_value * (1 + 1e-9):
                best_state, best_value = refined, value
        return SearchOutcome(mode, best_state, best_value, initial, search.iterations, search.flow_evaluations)


def solve(cluster: Cluster, mode: str = "auto", seed: int = 0, time_limit_s: float | None = None,
          budget_per_hour: float | None = None) -> Plan:
    """Plan ``cluster``. Raises ``InfeasibleFleetError`` when no replica fits, ``PlanInputError`` on a bad mode.

    With a price budget (the argument, else ``workload.price_budget_per_hour``)
    below what the whole fleet costs, the fleet is read as availability and
    ``choose_gpus`` first picks which GPUs to rent.
    """
    if mode not in MODES:
        raise PlanInputError("mode", f"{mode!r} is not a mode; choose one of: {', '.join(MODES)}")
    if time_limit_s is None:
        time_limit_s = default_time_limit(cluster)
    if time_limit_s <= 0:
        raise PlanInputError("time_limit_s", f"must be > 0, got {time_limit_s:g}")
    started = time.monotonic()
    budget = budget_per_hour if budget_per_hour is not None else cluster.workload.price_budget_per_hour
    budget_info = None
    if budget is not None and budget < cluster.price_per_hour:
        cluster, budget_info = _rent_within_budget(cluster, budget, time_limit_s)
    planner = Planner(cluster)
    planner.check_feasible()
    modes = [DISAGGREGATED, COLOCATED] if mode == "auto" else [mode]
    outcomes = []
    for k, m in enumerate(modes):
        # Split what is left of the time between the searches still to run.
        left = time_limit_s - (time.monotonic() - started)
        deadline = time.monotonic() + left / (len(modes) - k)
        outcomes.append(planner.search(m, seed, deadline))
    best = max(outcomes, key=lambda o: (o.value_rps, o.mode == DISAGGREGATED))
    _check_serves(planner, best)
    info = {
        "name": "heuristic",
        "mode_requested": mode,
        "seed": seed,
        "time_limit_s": time_limit_s,
        "solve_time_s": round(time.monotonic() - started, 3),
        "iterations": best.iterations,
        "flow_evaluations": best.flow_evaluations,
        "strategy_evaluations": planner.evaluator.evaluations,
        "initial_throughput_rps": round(float(best.initial_rps), 6),
        "alternatives": {o.mode: round(float(o.value_rps), 6) for o in outcomes},
    }
    if budget_info is not None:
        info["budget"] = budget_info
    return build_plan(cluster, planner.evaluator, planner.routes, best.state, best.mode, info)


def _rent_within_budget(cluster: Cluster, budget: float, time_limit_s: float) -> tuple[Cluster, dict]:
    """The sub-fleet ``choose_gpus`` rents within the budget, and what it chose (for the plan's solver info)."""
    Planner(cluster).check_feasible()
    choice = choose_gpus(cluster, budget, time_limit_s=max(time_limit_s / 3, 1.0))
    if choice.estimated_rps <= 0:  # renting nothing that serves: an unreachable SLO is the likely cause
        check_slos_reachable(cluster)
    info = {"budget_per_hour": budget, "rented": choice.counts, "rented_cost_per_hour": round(choice.cost_per_hour, 4),
            "estimated_rps": round(choice.estimated_rps, 6), "status": choice.status}
    return cluster.subset(choice.node_counts), info


def _check_serves(planner: Planner, best: SearchOutcome) -> None:
    """Raise ``InfeasibleFleetError`` when the best search serves nothing, saying why."""
    if best.value_rps <= 0:  # an SLO no GPU meets reads as a lack of groups or memory below: name it first
        check_slos_reachable(planner.cluster)
    if best.value_rps <= 0 and best.mode == DISAGGREGATED and best.state.groups:
        need, have = 2 * planner.evaluator.min_replica_bytes(), planner.fleet_memory_bytes()
        raise InfeasibleFleetError(
            "disaggregated serving needs a prefill and a decode replica, and this fleet holds only one "
            f"({max(need - have, 0) / 1024**3:.1f} GiB short of two); use --mode colocated or auto",
            shortfall_gib=max(need - have, 0) / 1024**3,
        )
    if best.value_rps <= 0 and not best.state.groups:
        raise InfeasibleFleetError(
            "no group of the fleet can hold a replica with a valid TP/PP layout (every stage needs at least one "
            "layer and fitting weights); add memory or raise options.max_pipeline_stages",
            shortfall_gib=0.0,
        )


def solve_exact_plan(cluster: Cluster, mode: str = DISAGGREGATED, time_limit_s: float = 60.0) -> Plan:
    """The certified optimum (small fleets only) as a plan, with the solver's bound."""
    if mode not in (DISAGGREGATED, COLOCATED):
        raise PlanInputError("mode", f"the exact solver takes mode {DISAGGREGATED!r} or {COLOCATED!r}, not {mode!r}")
    started = time.monotonic()
    planner = Planner(cluster)
    planner.check_feasible()
    result = solve_exact(cluster, mode, time_limit_s, planner.evaluator, planner.routes)
    if result.bound_rps <= 0:
        check_slos_reachable(cluster)
    info = {
        "name": "exact",
        "mode_requested": mode,
        "status": result.status,
        "optimal": result.optimal,
        "bound_rps": round(float(result.bound_rps), 6),
        "compositions": result.compositions,
        "time_limit_s": time_limit_s,
        "solve_time_s": round(time.monotonic() - started, 3),
    }
    return build_plan(cluster, planner.evaluator, planner.routes, result.state, mode, info)
