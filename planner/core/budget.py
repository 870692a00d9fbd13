"""Which GPUs to rent (OR-Tools CP-SAT): within a price per hour for the most throughput (budget mode),
or the cheapest that serve a request rate (right-sizing, ``planner.core.right_size``).

The fleet in the cluster file is read as what is *available* (per node: type,
count, region). Candidate replicas are templates: k GPUs of one node, with k
dividing the node size so that copies pack into nodes; and, for a type whose
node cannot hold a replica, whole nodes of that type joined by pipeline
parallelism. Each template gets its prefill and decode capacity from the same
``GroupEvaluator`` as the heuristic. CP-SAT then chooses how many copies of
each template serve each role:

    maximise   min(sum prefill capacity, sum decode capacity)
    subject to sum price * GPUs <= budget,  GPUs of each node class <= available

or, right-sizing for a rate R:

    minimise   sum price * GPUs
    subject to sum prefill capacity >= R,  sum decode capacity >= R,  GPUs of each node class <= available

The chosen counts are materialised as a sub-fleet (filling nodes in the order
the file lists them) and planned by the heuristic, which may regroup them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

from ortools.sat.python import cp_model

from common.roles import Role
from planner.core.groups import Group
from planner.core.strategy import GroupEvaluator
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


class _Template(NamedTuple):
    """A replica that copies of can be rented: ``gpus`` GPUs of one node class."""

    key: tuple  # the node class (type, size, region)
    group: Group
    gpus: int
    prefill_rps: float
    decode_rps: float


class _Market(NamedTuple):
    """What can be rented: the node classes, their replica templates and prices."""

    classes: dict[tuple, list[int]]
    templates: list[_Template]
    price: dict[tuple, float]  # $/hour per GPU of each class

    @property
    def cents(self) -> dict[tuple, int]:
        return {key: int(round(p * 100)) for key, p in self.price.items()}

    def cost_cents(self, x) -> cp_model.LinearExpr:
        cents = self.cents
        return sum(cents[self.templates[i].key] * self.templates[i].gpus * v for (i, _), v in x.items())

    def capacity(self, x, role: Role) -> cp_model.LinearExpr:
        """Capacity of the copies rented for `role`, in requests/s x SCALE."""
        rps = (lambda t: t.prefill_rps) if role == Role.PREFILL else (lambda t: t.decode_rps)
        return sum(int(rps(self.templates[i]) * SCALE) * v for (i, r), v in x.items() if r == role)


def _market(cluster: Cluster, evaluator: GroupEvaluator | None) -> _Market:
    ev = evaluator or GroupEvaluator(cluster)
    classes = _classes(cluster)
    templates = [t for key, nodes in classes.items() for t in _templates(ev, key, nodes)]
    return _Market(classes, templates, {key: cluster.nodes[nodes[0]].spec.price_per_hour
                                        for key, nodes in classes.items()})


def choose_gpus(cluster: Cluster, budget_per_hour: float, time_limit_s: float = 20.0,
                evaluator: GroupEvaluator | None = None) -> BudgetChoice:
    if budget_per_hour <= 0:
        raise PlanInputError("workload.price_budget_per_hour", f"must be > 0, got {budget_per_hour:g}")
    started = time.monotonic()
    market = _market(cluster, evaluator)
    templates, classes = market.templates, market.classes
    _check_budget_buys_two(templates, market.price, budget_per_hour)
    model = cp_model.CpModel()
    x = _copy_vars(model, templates, classes)
    model.Add(market.cost_cents(x) <= int(budget_per_hour * 100))
    total = sum(int(max(t.prefill_rps, t.decode_rps) * SCALE) * cluster.num_gpus for t in templates)
    obj = model.NewIntVar(0, total, "throughput")
    model.Add(obj <= market.capacity(x, Role.PREFILL))
    model.Add(obj <= market.capacity(x, Role.DECODE))
    # Among plans of equal throughput, prefer the cheaper one.
    model.Maximize(obj * 10_000 - market.cost_cents(x))
    solver, status = _solve(model, time_limit_s)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise PlanInputError("workload.price_budget_per_hour", f"budget selection failed: {solver.StatusName(status)}")
    return _choice(market, x, solver, status, solver.Value(obj) / SCALE, started)


def cheapest_gpus(cluster: Cluster, target_rps: float, time_limit_s: float = 20.0,
                  evaluator: GroupEvaluator | None = None) -> BudgetChoice | None:
    """The cheapest GPUs whose replicas give at least `target_rps` of prefill and of decode capacity
    (None: the whole fleet cannot)."""
    started = time.monotonic()
    market = _market(cluster, evaluator)
    model = cp_model.CpModel()
    x = _copy_vars(model, market.templates, market.classes)
    need = int(math.ceil(target_rps * SCALE))
    model.Add(market.capacity(x, Role.PREFILL) >= need)
    model.Add(market.capacity(x, Role.DECODE) >= need)
    model.Minimize(market.cost_cents(x))
    solver, status = _solve(model, time_limit_s)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    capacity = min(solver.Value(market.capacity(x, role)) for role in (Role.PREFILL, Role.DECODE)) / SCALE
    return _choice(market, x, solver, status, capacity, started)


def _solve(model: cp_model.CpModel, time_limit_s: float) -> tuple[cp_model.CpSolver, int]:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 2
    return solver, solver.Solve(model)


def _choice(market: _Market, x, solver: cp_model.CpSolver, status: int, estimated_rps: float,
            started: float) -> BudgetChoice:
    per_class: dict[tuple, int] = {}
    for (i, _), v in x.items():
        key = market.templates[i].key
        per_class[key] = per_class.get(key, 0) + market.templates[i].gpus * solver.Value(v)
    counts, node_counts = _fill_nodes(per_class, market.classes)
    return BudgetChoice(counts=counts, node_counts=node_counts,
                        cost_per_hour=sum(market.price[key] * k for key, k in per_class.items()),
                        estimated_rps=estimated_rps, status=solver.StatusName(status),
                        solve_time_s=time.monotonic() - started)


def _templates(ev: GroupEvaluator, key: tuple, nodes: list[int]) -> list[_Template]:
    """Replicas of one node class: k GPUs of one node (k dividing the node), else whole nodes pipelined."""
    minimum = ev.min_replica_bytes()
    size = key[1]
    out = []
    for k in range(1, size + 1):
        if size % k:
            continue
        g: Group = ((nodes[0], k),)
        if ev.memory_bytes(g) < minimum:
            continue
        perf = ev.evaluate(g)
        if perf.feasible:
            out.append(_Template(key, g, k, perf.prefill.capacity_rps if perf.prefill else 0.0,
                                 perf.decode.capacity_rps if perf.decode else 0.0))
    if out:
        return out
    for m in range(2, len(nodes) + 1):
        g = tuple((n, size) for n in nodes[:m])
        if ev.memory_bytes(g) < minimum:
            continue
        perf = ev.evaluate(g)
        if perf.feasible:
            return [_Template(key, g, m * size, perf.prefill.capacity_rps if perf.prefill else 0.0,
                              perf.decode.capacity_rps if perf.decode else 0.0)]
    return []


def _check_budget_buys_two(templates: list[_Template], price: dict[tuple, float], budget_per_hour: float) -> None:
    cheapest = min((price[t.key] * t.gpus for t in templates), default=None)
    if cheapest is None:
        raise InfeasibleFleetError("no node, nor a set of nodes of one type, holds a replica: budget mode "
                                   "rents whole replicas of one type", shortfall_gib=0.0)
    if 2 * cheapest > budget_per_hour:
        raise PlanInputError(
            "workload.price_budget_per_hour",
            f"${budget_per_hour:g}/h cannot rent one prefill and one decode replica; the cheapest replica costs "
            f"${cheapest:.2f}/h, so at least ${2 * cheapest:.2f}/h is needed",
        )


def _copy_vars(model: cp_model.CpModel, templates: list[_Template], classes: dict[tuple, list[int]]):
    """``x[(template, role)]``: copies rented for a role, within what each node class has."""
    x: dict[tuple[int, Role], cp_model.IntVar] = {}
    for idx, t in enumerate(templates):
        avail = len(classes[t.key]) * t.key[1]
        for role, cap in ((Role.PREFILL, t.prefill_rps), (Role.DECODE, t.decode_rps)):
            if cap > 0:
                x[(idx, role)] = model.NewIntVar(0, avail // t.gpus, f"x{idx}{role[0]}")
    for key, nodes in classes.items():
        terms = [templates[i].gpus * v for (i, _), v in x.items() if templates[i].key == key]
        if terms:
            model.Add(sum(terms) <= len(nodes) * key[1])
    return x


def _fill_nodes(per_class: dict[tuple, int], classes: dict[tuple, list[int]]) -> tuple[dict[str, int], dict[int, int]]:
    """(GPUs rented per type, per node): each class's count fills its nodes in file order."""
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
    return {t: c for t, c in sorted(counts.items()) if c}, node_counts
