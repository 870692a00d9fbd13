"""Right-sizing: the cheapest part of the fleet that serves the workload's arrival rate at the SLOs.

    solve --objective cost: target = arrival rate x (1 + headroom)
      1. `budget.cheapest_gpus(target)`: CP-SAT over replica templates (each a
         node class's GPUs with its prefill and decode capacity from the same
         evaluator as the search) for the cheapest rental whose prefill and
         decode capacity each reach the target;
      2. the heuristic plans that sub-fleet (it may regroup the GPUs);
      3. templates cannot see what the search finds (mixed groups, routes,
         shared links), so a plan short of the target asks step 1 for 15 %
         more, or for its shortfall if larger, and tries again (up to
         MAX_TRIES), else plans the whole fleet.
    The plan's solver info says what was rented, what it costs, and what the
    rest of the fleet is (its GPUs by type and $/hour): what could be released.
"""

from __future__ import annotations

import time

from common.plan import Plan
from planner.core.budget import cheapest_gpus
from planner.core.solver import Planner, default_time_limit, solve
from planner.spec.cluster import Cluster
from planner.spec.errors import InfeasibleFleetError, PlanInputError

DEFAULT_HEADROOM = 0.2
MAX_TRIES = 4
STEP = 1.15


def right_size(cluster: Cluster, headroom: float = DEFAULT_HEADROOM, mode: str = "auto", seed: int = 0,
               time_limit_s: float | None = None) -> Plan:
    """The plan of the cheapest sub-fleet that serves arrival rate x (1 + headroom)."""
    rate = cluster.workload.arrival_rate_rps
    if not rate:
        raise PlanInputError("workload.arrival_rate_rps", "right-sizing (--objective cost) needs the rate to serve: "
                             "give workload.arrival_rate_rps, or a trace (its rate is read from it)")
    if headroom < 0:
        raise PlanInputError("headroom", f"must be >= 0, got {headroom:g}")
    started = time.monotonic()
    time_limit_s = time_limit_s or default_time_limit(cluster)
    Planner(cluster).check_feasible()
    target = rate * (1 + headroom)
    ask, tries = target, []
    for _ in range(MAX_TRIES):
        choice = cheapest_gpus(cluster, ask, time_limit_s=max(time_limit_s / 3, 1.0))
        if choice is None:
            break
        try:
            plan = solve(cluster.subset(choice.node_counts), mode=mode, seed=seed, time_limit_s=time_limit_s)
        except InfeasibleFleetError:  # the rental cannot be grouped in this mode (e.g. one replica, disaggregated)
            plan = None
        tries.append({"asked_rps": round(ask, 4), "rented": choice.counts, "cost_per_hour": round(choice.cost_per_hour, 4),
                      "planned_rps": round(plan.throughput_rps, 4) if plan else 0.0})
        if plan is not None and plan.throughput_rps >= target * (1 - 1e-6):
            return _with_info(plan, cluster, target, headroom, tries, started)
        # Ask for at least the shortfall: templates that overrate a rental by 2x would
        # otherwise be handed the same rental on every try.
        ask *= max(STEP, target / plan.throughput_rps) if plan is not None and plan.throughput_rps > 0 else STEP
    plan = solve(cluster, mode=mode, seed=seed, time_limit_s=time_limit_s)
    return _with_info(plan, cluster, target, headroom, tries, started)


def _with_info(plan: Plan, fleet: Cluster, target: float, headroom: float, tries: list[dict], started: float) -> Plan:
    rented: dict[str, int] = {}
    for group in plan.groups:
        for gpu_type, count in group.gpu_types.items():
            rented[gpu_type] = rented.get(gpu_type, 0) + count
    price = {n.gpu_type: n.spec.price_per_hour for n in fleet.nodes}
    fleet_counts: dict[str, int] = {}
    for node in fleet.nodes:
        fleet_counts[node.gpu_type] = fleet_counts.get(node.gpu_type, 0) + node.num_gpus
    released = {t: n - rented.get(t, 0) for t, n in sorted(fleet_counts.items()) if n - rented.get(t, 0) > 0}
    plan.solver["right_sizing"] = {
        "target_rps": round(target, 4), "headroom": headroom, "meets_target": plan.throughput_rps >= target * (1 - 1e-6),
        "serving_gpus": rented, "serving_cost_per_hour": round(sum(price[t] * n for t, n in rented.items()), 4),
        "fleet_cost_per_hour": round(fleet.price_per_hour, 4), "released_gpus": released,
        "released_cost_per_hour": round(sum(price[t] * n for t, n in released.items()), 4),
        "tries": tries, "solve_time_s": round(time.monotonic() - started, 3)}
    return plan
