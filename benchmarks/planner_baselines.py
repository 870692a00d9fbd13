"""Baselines the benchmark compares the planner with, run in the same process on the same cost model.

- ``homogeneous_best``: the best single-type subset of the fleet at the same
  price per hour (as many GPUs of one type as the budget buys and the fleet
  has), planned by the planner itself; the best type wins.
- ``distserve_uniform``: DistServe-style placement: every replica has the same
  group size and parallel configuration, replicas are cut in fleet order, and
  the number of prefill replicas is enumerated (DistServe searches one GPU
  type; on a mixed fleet it does not know which GPUs are which).
- ``random_partition``: GPUs shuffled and cut into groups that just hold a
  replica, roles balanced by capacity ratio, scored by max-flow; best of a
  few seeds.
- ``per_type_split``: every GPU type wholly prefill or wholly decode (all
  2^types - 2 assignments), minimal groups inside each node.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from common.roles import Role
from planner.core.flow import RouteTable
from planner.core.groups import Group
from planner.core.partition import minimal_groups
from planner.core.refine import DISAGGREGATED, Search, State
from planner.core.solver import solve
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster
from planner.spec.errors import PlanInputError


@dataclass(slots=True)
class BaselineResult:
    name: str
    throughput_rps: float
    cost_per_hour: float
    detail: str


def _flow(ev: GroupEvaluator, routes: RouteTable, groups: list[Group], roles: list[Role]) -> float:
    value, _ = Search(ev, routes, DISAGGREGATED).evaluate(State(list(groups), list(roles), {}))
    return value


def per_type_split(cluster: Cluster, ev: GroupEvaluator | None = None, routes: RouteTable | None = None) -> BaselineResult:
    ev = ev or GroupEvaluator(cluster)
    routes = routes or RouteTable(cluster)
    groups = minimal_groups(cluster, ev)
    types = sorted({cluster.nodes[g[0][0]].gpu_type for g in groups})
    best = (0.0, "no feasible split")
    for pattern in itertools.product((Role.PREFILL, Role.DECODE), repeat=len(types)):
        if len(set(pattern)) < 2 and len(types) > 1:
            continue
        role_of = dict(zip(types, pattern))
        if len(types) == 1:  # one type: half the groups each way
            roles = [Role.PREFILL if i % 2 == 0 else Role.DECODE for i in range(len(groups))]
        else:
            roles = [role_of[cluster.nodes[g[0][0]].gpu_type] for g in groups]
        value = _flow(ev, routes, groups, roles)
        if value > best[0]:
            best = (value, ", ".join(f"{t}={r}" for t, r in role_of.items()))
    return BaselineResult("per-type P/D split", best[0], cluster.price_per_hour, best[1])


def distserve_uniform(cluster: Cluster, ev: GroupEvaluator | None = None, routes: RouteTable | None = None) -> BaselineResult:
    ev = ev or GroupEvaluator(cluster)
    routes = routes or RouteTable(cluster)
    best = (0.0, "no feasible uniform size")
    sizes = sorted({k for n in cluster.nodes for k in range(1, n.num_gpus + 1) if n.num_gpus % k == 0}
                   | {n.num_gpus * m for n in cluster.nodes for m in (2, 4)})
    for size in sizes:
        groups: list[Group] = []
        carry: list[tuple[int, int]] = []
        for node in cluster.nodes:  # cut GPUs in fleet order into groups of `size`
            left = node.num_gpus
            while left:
                need = size - sum(k for _, k in carry)
                take = min(need, left)
                carry.append((node.index, take))
                left -= take
                if sum(k for _, k in carry) == size:
                    groups.append(tuple(carry))
                    carry = []
        groups = [g for g in groups if ev.evaluate(g).feasible]
        if len(groups) < 2:
            continue
        for k in range(1, len(groups)):
            roles = [Role.PREFILL] * k + [Role.DECODE] * (len(groups) - k)
            value = _flow(ev, routes, groups, roles)
            if value > best[0]:
                best = (value, f"{len(groups)} groups of {size} GPUs, {k} prefill")
    return BaselineResult("DistServe-style uniform", best[0], cluster.price_per_hour, best[1])


def random_partition(cluster: Cluster, seeds: int = 5, ev: GroupEvaluator | None = None,
                     routes: RouteTable | None = None) -> BaselineResult:
    ev = ev or GroupEvaluator(cluster)
    routes = routes or RouteTable(cluster)
    minimum = ev.min_replica_bytes()
    best = (0.0, "")
    for seed in range(seeds):
        rng = random.Random(seed)
        gpus = [n.index for n in cluster.nodes for _ in range(n.num_gpus)]
        rng.shuffle(gpus)
        groups: list[Group] = []
        current: dict[int, int] = {}
        for node in gpus:
            current[node] = current.get(node, 0) + 1
            g = tuple(sorted(current.items()))
            if ev.memory_bytes(g) >= minimum * rng.uniform(1.0, 1.5) and ev.evaluate(g).feasible:
                groups.append(g)
                current = {}
        state = Search(ev, routes, DISAGGREGATED).assign_roles(groups)
        value = _flow(ev, routes, state.groups, state.roles)
        if value > best[0]:
            best = (value, f"seed {seed}: {len(groups)} groups")
    return BaselineResult("random partition + max-flow", best[0], cluster.price_per_hour, best[1])


def homogeneous_best(cluster: Cluster, budget_per_hour: float, time_limit_s: float = 10.0) -> BaselineResult:
    best = BaselineResult("best homogeneous subset", 0.0, 0.0, "no type fits")
    for gpu_type in cluster.gpu_types():
        nodes = [n for n in cluster.nodes if n.gpu_type == gpu_type]
        price = nodes[0].spec.price_per_hour
        want = min(sum(n.num_gpus for n in nodes), int(budget_per_hour / price + 1e-9))
        counts: dict[int, int] = {}
        for n in nodes:
            take = min(n.num_gpus, want)
            if take:
                counts[n.index] = take
                want -= take
        if not counts:
            continue
        sub = cluster.subset(counts, name=f"{cluster.name}-{gpu_type}")
        try:
            plan = solve(sub, mode="auto", time_limit_s=time_limit_s, budget_per_hour=float("inf"))
        except PlanInputError:  # this type cannot hold the model
            continue
        if plan.throughput_rps > best.throughput_rps:
            best = BaselineResult(best.name, plan.throughput_rps, sub.price_per_hour,
                                  f"{sub.num_gpus}x{gpu_type} ({plan.mode})")
    return best
