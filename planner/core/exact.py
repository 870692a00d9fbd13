"""Exact optimum for small fleets (OR-Tools CP-SAT), to certify the heuristic.

The heuristic's groups are multisets of GPUs by node, so every possible group
is a *composition*: a vector ``c`` with ``0 <= c[v] <= gpus on node v``. For
each composition the same ``GroupEvaluator`` gives its best prefill and decode
capacity, so the optimum below is exact for the planner's own cost model.

Variables: ``y[c, role]`` = how many groups of composition c serve in a role.
Constraints: each node's GPUs are used at most once. Objective: the max flow.
Copies of a composition are interchangeable, so the flow between copies can be
taken uniform and aggregated per composition pair without loss: a route
between compositions c -> c' then carries at most ``cap(c, c') * y[c,P] *
y[c',D]``. Where a route cannot bind (its capacity is at least either end's),
no product is needed; where it can (slow links between regions) CP-SAT models
the product exactly, and the routes over one inter-region link share its
capacity (a linear constraint). When no route can bind at all the flow is just
``min(sum prefill, sum decode)`` and dominated compositions are pruned.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from common.roles import Role
from planner.core.flow import RouteTable
from planner.core.groups import Group
from planner.core.refine import COLOCATED, DISAGGREGATED, Search, State
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster
from planner.spec.errors import PlanInputError

MAX_EXACT_GPUS = 16
MAX_COMPOSITIONS = 20_000
SCALE = 1000  # capacities in milli-requests/s


@dataclass(slots=True)
class ExactResult:
    state: State
    value_rps: float
    bound_rps: float
    optimal: bool
    solve_time_s: float
    compositions: int
    status: str


def compositions(cluster: Cluster) -> list[Group]:
    counts = [n.num_gpus for n in cluster.nodes]
    total = math.prod(c + 1 for c in counts) - 1
    if cluster.num_gpus > MAX_EXACT_GPUS or total > MAX_COMPOSITIONS:
        raise PlanInputError(
            "fleet",
            f"the exact solver takes at most {MAX_EXACT_GPUS} GPUs and {MAX_COMPOSITIONS} group compositions; "
            f"this fleet has {cluster.num_gpus} GPUs and {total} compositions (use the heuristic)",
        )
    out = []
    for vec in itertools.product(*(range(c + 1) for c in counts)):
        group = tuple((i, k) for i, k in enumerate(vec) if k)
        if group:
            out.append(group)
    return out


def _dominated(items: list[tuple[Group, float]]) -> set[Group]:
    """Compositions another one beats with a subset of its GPUs."""
    out: set[Group] = set()
    vecs = [(dict(g), cap, g) for g, cap in items]
    for a, cap_a, ga in vecs:
        for b, cap_b, gb in vecs:
            if ga is gb or cap_b < cap_a or gb in out:
                continue
            if all(b.get(n, 0) <= k for n, k in a.items()) and all(n in a for n in b) and (cap_b > cap_a or gb < ga):
                out.add(ga)
                break
    return out


def solve_exact(
    cluster: Cluster,
    mode: str = DISAGGREGATED,
    time_limit_s: float = 60.0,
    evaluator: GroupEvaluator | None = None,
    routes: RouteTable | None = None,
    workers: int = 2,
) -> ExactResult:
    started = time.monotonic()
    ev = evaluator or GroupEvaluator(cluster)
    routes = routes or RouteTable(cluster)
    comps = compositions(cluster)
    roles = [Role.COLOCATED] if mode == COLOCATED else [Role.PREFILL, Role.DECODE]
    perf, cands = _candidates(ev, comps, roles)
    pairs, simple = _route_pairs(cands, perf, routes) if mode != COLOCATED else ({}, True)
    if simple:
        for role in roles:
            drop = _dominated(cands[role])
            cands[role] = [(g, c) for g, c in cands[role] if g not in drop]

    model = cp_model.CpModel()
    y = _copy_vars(model, cluster, cands, roles)
    total_cap = {role: sum(int(c * SCALE) * cluster.num_gpus for _, c in cands[role]) for role in roles}
    objective = model.NewIntVar(0, max(total_cap.values(), default=0), "throughput")
    if mode == COLOCATED:
        model.Add(objective <= sum(int(c * SCALE) * y[(g, Role.COLOCATED)] for g, c in cands[Role.COLOCATED]))
    elif simple:
        model.Add(objective <= sum(int(c * SCALE) * y[(g, Role.PREFILL)] for g, c in cands[Role.PREFILL]))
        model.Add(objective <= sum(int(c * SCALE) * y[(g, Role.DECODE)] for g, c in cands[Role.DECODE]))
    else:
        model.Add(objective <= _route_flow(model, cluster, cands, pairs, routes, y))
    model.Maximize(objective)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit_s - (time.monotonic() - started), 1.0)
    solver.parameters.num_workers = workers
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ExactResult(State([], [], {}), 0.0, 0.0, False, time.monotonic() - started, len(comps),
                           solver.StatusName(status))
    state = State([], [], {})
    for (g, role), var in y.items():
        for _ in range(solver.Value(var)):
            state.groups.append(g)
            state.roles.append(role)
    value, _ = Search(ev, routes, COLOCATED if mode == COLOCATED else DISAGGREGATED).evaluate(state)
    # Capacities were floored to milli-requests/s: the bound may sit below the real value by that much.
    bound = max(solver.BestObjectiveBound() / SCALE, value)
    return ExactResult(state, value, bound, status == cp_model.OPTIMAL, time.monotonic() - started, len(comps),
                       solver.StatusName(status))


def _candidates(ev: GroupEvaluator, comps: list[Group], roles: list[Role]):
    """(each composition's GroupPerf, per role the compositions that serve it with their capacity)."""
    minimum = ev.min_replica_bytes()
    perf = {g: ev.evaluate(g) for g in comps if ev.memory_bytes(g) >= minimum}
    cands: dict[Role, list[tuple[Group, float]]] = {}
    for role in roles:
        role_perf = {g: ev.perf(g, role) for g in perf}
        cands[role] = [(g, p.capacity_rps) for g, p in role_perf.items() if p is not None and p.capacity_rps > 0]
    return perf, cands


def _route_pairs(cands, perf, routes: RouteTable) -> tuple[dict[tuple[Group, Group], tuple[bool, float]], bool]:
    """Per (prefill, decode) composition pair: (route allowed within the KV budget, its capacity); and
    whether the problem is simple (every route allowed, none binding, none over a shared link)."""
    pairs: dict[tuple[Group, Group], tuple[bool, float]] = {}
    simple = True
    for pg, cp in cands[Role.PREFILL]:
        pp = perf[pg].prefill
        for dg, cd in cands[Role.DECODE]:
            dp = perf[dg].decode
            r = routes.route(pg, pp, dg, dp)
            allowed = r.transfer_s + dp.latency_s <= pp.kv_budget_s
            binding = allowed and r.capacity_rps < min(cp, cd)
            pairs[(pg, dg)] = (allowed, r.capacity_rps)
            crosses = (routes.region(pg), routes.region(dg)) in routes.link_rps
            if binding or not allowed or crosses:
                simple = False
    return pairs, simple


def _copy_vars(model: cp_model.CpModel, cluster: Cluster, cands, roles: list[Role]):
    """``y[(composition, role)]``: copies serving in a role; each node's GPUs are used at most once."""
    node_use: dict[int, list] = {n.index: [] for n in cluster.nodes}
    y: dict[tuple[Group, Role], cp_model.IntVar] = {}
    for role in roles:
        for g, _ in cands[role]:
            copies = min(cluster.nodes[n].num_gpus // k for n, k in g)
            var = model.NewIntVar(0, copies, f"y_{role}_{len(y)}")
            y[(g, role)] = var
            for n, k in g:
                node_use[n].append(k * var)
    for n, terms in node_use.items():
        if terms:
            model.Add(sum(terms) <= cluster.nodes[n].num_gpus)
    return y


def _route_flow(model: cp_model.CpModel, cluster: Cluster, cands, pairs, routes: RouteTable, y):
    """The flow through the prefill -> decode network, as a CP-SAT expression (routes can bind).

    A route's flow is bounded by its capacity times the copies at both ends
    (an exact product) where it can bind, and the routes over one
    inter-region link share that link.
    """
    out_flow: dict[Group, list] = {g: [] for g, _ in cands[Role.PREFILL]}
    in_flow: dict[Group, list] = {g: [] for g, _ in cands[Role.DECODE]}
    cap_p = dict(cands[Role.PREFILL])
    cap_d = dict(cands[Role.DECODE])
    over_link: dict[tuple[str, str], list] = {}
    route_flows: list = []
    for (pg, dg), (allowed, rcap) in pairs.items():
        if not allowed or pg not in cap_p or dg not in cap_d:
            continue
        hi = int(min(cap_p[pg], cap_d[dg]) * SCALE) * cluster.num_gpus
        f = model.NewIntVar(0, hi, f"flow_{len(route_flows)}")
        route_flows.append(f)
        out_flow[pg].append(f)
        in_flow[dg].append(f)
        link = (routes.region(pg), routes.region(dg))
        if link in routes.link_rps:
            over_link.setdefault(link, []).append(f)
        if rcap < min(cap_p[pg], cap_d[dg]):
            z = model.NewIntVar(0, cluster.num_gpus**2, "z")
            model.AddMultiplicationEquality(z, [y[(pg, Role.PREFILL)], y[(dg, Role.DECODE)]])
            model.Add(f <= int(rcap * SCALE) * z)
    for g, c in cands[Role.PREFILL]:
        if out_flow[g]:
            model.Add(sum(out_flow[g]) <= int(c * SCALE) * y[(g, Role.PREFILL)])
    for g, c in cands[Role.DECODE]:
        if in_flow[g]:
            model.Add(sum(in_flow[g]) <= int(c * SCALE) * y[(g, Role.DECODE)])
    for link, fs in over_link.items():  # a link between regions is one pipe all its routes share
        model.Add(sum(fs) <= int(routes.link_rps[link] * SCALE))
    return sum(f for fs in out_flow.values() for f in fs)
