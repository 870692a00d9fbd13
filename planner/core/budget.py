"""Budget mode: which GPUs to rent, within a price per hour, for the most throughput (OR-Tools CP-SAT).

The fleet in the cluster file is read as what is *available* (per node: type,
count, region). Candidate replicas are templates: k GPUs of one node, with k
dividing the node size so that copies pack into nodes; and, for a type whose
node cannot hold a replica, whole nodes of that type joined by pipeline
parallelism. Each template gets its prefill and decode capacity from the same
``GroupEvaluator`` as the heuristic. CP-SAT then chooses how many copies of
each template serve each role:

    maximise   min(sum prefill capacity, sum decode capacity)
    subject to sum price * GPUs <= budget,  GPUs of each node class <= available

The chosen counts are materialised as a sub-fleet (filling nodes in the order
the file lists them) and planned by the heuristic, which may regroup them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from planner.core.strategy import DECODE, PREFILL, Group, GroupEvaluator
from planner.spec.cluster import Cluster
from planner.spec.errors import InfeasibleFleetError, PlanInputError

SCALE = 1000


@dataclass(slots=True)
class BudgetChoice:
    counts: dict[str, int]  # GPU type -> GPUs rented
    node_counts: dict[int, int]  # node index -> GPUs rented there
    cost_per_hour: float
    estimated_rps: float
    status: str
    solve_time_s: float


def _classes(cluster: Cluster) -> dict[tuple, list[int]]:
    """Interchangeable nodes: same type, size, region and links."""
    out: dict[tuple, list[int]] = {}
    for n in cluster.nodes:
        out.setdefault((n.gpu_type, n.num_gpus, n.region), []).append(n.index)
    return out


def choose_gpus(cluster: Cluster, budget_per_hour: float, time_limit_s: float = 20.0,
                evaluator: GroupEvaluator | None = None) -> BudgetChoice:
    if budget_per_hour <= 0:
        raise PlanInputError("workload.price_budget_per_hour", f"must be > 0, got {budget_per_hour:g}")
    started = time.monotonic()
    ev = evaluator or GroupEvaluator(cluster)
    minimum = ev.min_replica_bytes()
    classes = _classes(cluster)
    templates: list[tuple[tuple, Group, int, float, float]] = []  # class, group, gpus, cap P, cap D
    for key, nodes in classes.items():
        size = key[1]
        first = nodes[0]
        found = False
        for k in range(1, size + 1):
            if size % k:
                continue
            g: Group = ((first, k),)
            if ev.memory_bytes(g) < minimum:
                continue
            perf = ev.evaluate(g)
            if perf.feasible:
                found = True
                templates.append((key, g, k, perf.prefill.capacity_rps if perf.prefill else 0.0,
                                  perf.decode.capacity_rps if perf.decode else 0.0))
        if not found:  # whole nodes of this class, pipelined
            for m in range(2, len(nodes) + 1):
                g = tuple((n, size) for n in nodes[:m])
                if ev.memory_bytes(g) < minimum:
                    continue
                perf = ev.evaluate(g)
                if perf.feasible:
                    templates.append((key, g, m * size, perf.prefill.capacity_rps if perf.prefill else 0.0,
                                      perf.decode.capacity_rps if perf.decode else 0.0))
                    break
    price = {key: cluster.nodes[nodes[0]].spec.price_per_hour for key, nodes in classes.items()}
    cheapest = min((price[t[0]] * t[2] for t in templates), default=None)
    if cheapest is None:
        raise InfeasibleFleetError("no node, nor a set of nodes of one type, holds a replica: budget mode "
                                   "rents whole replicas of one type", shortfall_gib=0.0)
    if 2 * cheapest > budget_per_hour:
        raise PlanInputError(
            "workload.price_budget_per_hour",
            f"${budget_per_hour:g}/h cannot rent one prefill and one decode replica; the cheapest replica costs "
            f"${cheapest:.2f}/h, so at least ${2 * cheapest:.2f}/h is needed",
        )
    model = cp_model.CpModel()
    x: dict[tuple[int, str], cp_model.IntVar] = {}
    for idx, (key, g, gpus, cp, cd) in enumerate(templates):
        avail = len(classes[key]) * key[1]
        for role, cap in ((PREFILL, cp), (DECODE, cd)):
            if cap > 0:
                x[(idx, role)] = model.NewIntVar(0, avail // gpus, f"x{idx}{role[0]}")
    for key, nodes in classes.items():
        terms = [templates[i][2] * v for (i, _), v in x.items() if templates[i][0] == key]
        if terms:
            model.Add(sum(terms) <= len(nodes) * key[1])
    cents = {key: int(round(p * 100)) for key, p in price.items()}
    model.Add(sum(cents[templates[i][0]] * templates[i][2] * v for (i, _), v in x.items())
              <= int(budget_per_hour * 100))
    total = sum(int(max(t[3], t[4]) * SCALE) * cluster.num_gpus for t in templates)
    obj = model.NewIntVar(0, total, "throughput")
    model.Add(obj <= sum(int(templates[i][3] * SCALE) * v for (i, r), v in x.items() if r == PREFILL))
    model.Add(obj <= sum(int(templates[i][4] * SCALE) * v for (i, r), v in x.items() if r == DECODE))
    # Among plans of equal throughput, prefer the cheaper one.
    model.Maximize(obj * 10_000 - sum(cents[templates[i][0]] * templates[i][2] * v for (i, _), v in x.items()))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 2
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise PlanInputError("workload.price_budget_per_hour", f"budget selection failed: {solver.StatusName(status)}")
    per_class: dict[tuple, int] = {}
    for (i, _), v in x.items():
        per_class[templates[i][0]] = per_class.get(templates[i][0], 0) + templates[i][2] * solver.Value(v)
    node_counts: dict[int, int] = {}
    counts: dict[str, int] = {}
    for key, need in per_class.items():
        counts[key[0]] = counts.get(key[0], 0) + need
        for n in classes[key]:
            take = min(need, key[1])
            if take <= 0:
                break
            node_counts[n] = take
            need -= take
    cost = sum(price[key] * k for key, k in per_class.items())
    return BudgetChoice(
        counts={t: c for t, c in sorted(counts.items()) if c},
        node_counts=node_counts,
        cost_per_hour=cost,
        estimated_rps=solver.Value(obj) / SCALE,
        status=solver.StatusName(status),
        solve_time_s=time.monotonic() - started,
    )
