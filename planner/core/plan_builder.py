"""A solved state (groups and roles) -> the plan document the router reads (``common.plan.Plan``).

GPUs get their names (``node:index``, handed out in plan order), each group
its stages and layer ranges, each route its share of the max flow (weights
normalised per prefill group), and the plan its predictions: throughput, and
TTFT/TPOT averaged over the routes at the load served (the arrival rate, or
the throughput when none is given), with queueing at the prefill groups (planner.core.queueing)
and decode groups at the batch that load gives them (``core.predict``), TTFT
at the SLO's percentile prompt and the predicted SLO attainment.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from common.roles import Role
from planner.core.flow import FlowResult, RouteTable
from planner.core.groups import Group
from planner.core.perf import PhasePerf
from planner.core.predict import RouteLatency, colocated_latency, route_latency, tpot_at_load
from planner.core.refine import COLOCATED, Search, State
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster


@dataclass(slots=True)
class _Placed:
    """The groups as the plan lists them, with their strategies, and where each state index landed."""

    groups: list[GroupPlan]
    perfs: list[PhasePerf]
    gpu_groups: list[Group]  # the state's group behind each plan group
    position: dict[int, int]  # state index -> position in the plan
    unused_gpus: list[str]


@dataclass(slots=True)
class _Latency:
    """Load-weighted sums of TTFT, TTFT at the tail prompt, TPOT (seconds x requests/s) and SLO attainment."""

    ttft: float = 0.0
    ttft_tail: float = 0.0
    tpot: float = 0.0
    attainment: float = 0.0
    rate_rps: float = 0.0  # the weights' sum: the load, up to rounding (an average of 1s stays exactly 1)

    def mean(self, weighted_sum: float) -> float:
        return weighted_sum / self.rate_rps if self.rate_rps > 0 else 0.0

    def add(self, rate_rps: float, found: RouteLatency) -> None:
        self.rate_rps += float(rate_rps)
        self.ttft += float(rate_rps * found.ttft_mean_s)
        self.ttft_tail += float(rate_rps * found.ttft_tail_s)
        self.tpot += float(rate_rps * found.tpot_s)
        self.attainment += float(rate_rps * found.slo_attainment)


def build_plan(cluster: Cluster, evaluator: GroupEvaluator, routes: RouteTable, state: State, mode: str,
               info: dict, names: list[tuple[str, list[str]]] | None = None) -> Plan:
    """Turn a solved state into the plan document (GPU names, stages, routes, predictions).

    names: per state group, the id and GPU names it already has (a running plan re-planned: its
    groups keep their identity); None: ids and names handed out in plan order."""
    wl = cluster.workload
    throughput, flow = Search(evaluator, routes, mode).evaluate(state)
    placed = _place_groups(cluster, evaluator, state)
    load = min(wl.arrival_rate_rps, throughput) if wl.arrival_rate_rps else throughput
    scale = load / throughput if throughput > 0 else 0.0
    route_plans: list[RoutePlan] = []
    latency = _Latency()
    if mode == COLOCATED:
        for g, group, perf in zip(placed.groups, placed.gpu_groups, placed.perfs):
            g.load_rps = perf.capacity_rps * scale
            latency.add(g.load_rps, colocated_latency(evaluator, group, perf, g.load_rps))
    elif flow is not None:
        route_plans = _route_plans(evaluator, routes, state, flow, placed, scale)
        _add_route_latency(evaluator, route_plans, placed, latency)
    cost = cluster.price_per_hour
    tokens_per_s = throughput * wl.output_mean
    predicted = Predicted(
        throughput_rps=float(throughput),
        output_tokens_per_s=tokens_per_s,
        ttft_ms=latency.mean(latency.ttft) * 1e3,
        tpot_ms=latency.mean(latency.tpot) * 1e3,
        cost_per_hour=cost,
        tokens_per_dollar=tokens_per_s * 3600 / cost if cost > 0 else 0.0,
        load_rps=load,
        meets_arrival_rate=bool(throughput >= wl.arrival_rate_rps) if wl.arrival_rate_rps else None,
        ttft_tail_ms=latency.mean(latency.ttft_tail) * 1e3,
        slo_percentile=wl.slo_percentile,
        slo_attainment=latency.mean(latency.attainment),
    )
    if names is not None:
        _relabel(cluster, placed, route_plans, names)
    return Plan(mode=mode, cluster=cluster.name, model=cluster.model.to_json(), workload=wl.to_json(),
                groups=placed.groups, routes=route_plans, unused_gpus=placed.unused_gpus, predicted=predicted,
                solver=info)


def _place_groups(cluster: Cluster, ev: GroupEvaluator, state: State) -> _Placed:
    """Plan order (prefill groups, then decode, each by GPUs), GPU names and stages per group."""
    next_gpu = {n.index: 0 for n in cluster.nodes}
    placed = _Placed([], [], [], {}, [])
    order = sorted(range(len(state.groups)),
                   key=lambda i: ({Role.PREFILL: 0, Role.DECODE: 1}.get(state.roles[i], 0), state.groups[i], i))
    for i in order:
        group, role = state.groups[i], state.roles[i]
        perf = ev.perf(group, role)
        if perf is None:  # cannot serve this role: its GPUs go unused
            continue
        gpus_by_part = []
        for node, count in group:
            start = next_gpu[node]
            next_gpu[node] += count
            gpus_by_part.append(cluster.nodes[node].gpu_names[start:start + count])
        types: dict[str, int] = {}
        for node, count in group:
            t = cluster.nodes[node].gpu_type
            types[t] = types.get(t, 0) + count
        placed.position[i] = len(placed.groups)
        placed.perfs.append(perf)
        placed.gpu_groups.append(group)
        placed.groups.append(GroupPlan(
            id=f"g{len(placed.groups)}", role=role, gpus=[g for part in gpus_by_part for g in part], gpu_types=types,
            nodes=[cluster.nodes[n].name for n, _ in group], region=cluster.nodes[group[0][0]].region,
            tp=perf.tp, pp=perf.pp, layer_partition=[s.num_layers for s in perf.stages],
            stages=_stage_plans(cluster, group, perf, gpus_by_part),
            capacity_rps=perf.capacity_rps, load_rps=0.0, batch=perf.batch, latency_ms=perf.latency_s * 1e3,
            service_ms=perf.service_s * 1e3, kv_budget_ms=perf.kv_budget_s * 1e3,
        ))
    for node in cluster.nodes:
        placed.unused_gpus += node.gpu_names[next_gpu[node.index]:]
    return placed


def _relabel(cluster: Cluster, placed: _Placed, route_plans: list[RoutePlan],
             names: list[tuple[str, list[str]]]) -> None:
    """Give each placed group the id and GPU names its state group had (same GPUs per node, same order)."""
    new_id: dict[str, str] = {}
    for index, position in placed.position.items():
        group = placed.groups[position]
        group_id, gpus = names[index]
        if len(gpus) != len(group.gpus):
            raise ValueError(f"group {group_id}: {len(gpus)} GPU names for a group of {len(group.gpus)} GPUs")
        rename = dict(zip(group.gpus, gpus))
        new_id[group.id] = group_id
        group.id, group.gpus = group_id, list(gpus)
        for stage in group.stages:
            stage.gpus = [rename[g] for g in stage.gpus]
    for route in route_plans:
        route.prefill, route.decode = new_id[route.prefill], new_id[route.decode]
    used = {g for group in placed.groups for g in group.gpus}
    placed.unused_gpus = [gpu for gpu in cluster.gpu_names if gpu not in used]


def _stage_plans(cluster: Cluster, group, perf: PhasePerf, gpus_by_part: list[list[str]]) -> list[StagePlan]:
    """Each pipeline stage takes the next ``tp`` GPUs of its node and a run of layers."""
    used = {p: 0 for p in range(len(group))}
    stages = []
    for st in perf.stages:
        gpus = gpus_by_part[st.part][used[st.part]: used[st.part] + st.tp]
        used[st.part] += st.tp
        node = cluster.nodes[group[st.part][0]]
        stages.append(StagePlan(node.name, node.gpu_type, gpus, st.tp, [st.first_layer, st.first_layer + st.num_layers]))
    return stages


def _route_plans(ev: GroupEvaluator, routes: RouteTable, state: State, flow: FlowResult, placed: _Placed,
                 scale: float) -> list[RoutePlan]:
    """One route per prefill -> decode pair with flow; loads added to both groups, weights per prefill group."""
    groups, perfs, pos = placed.groups, placed.perfs, placed.position
    # evaluate() lists prefill/decode groups in state order; map them to plan order.
    p_state = [i for i, r in enumerate(state.roles) if r == Role.PREFILL and ev.evaluate(state.groups[i]).prefill]
    d_state = [i for i, r in enumerate(state.roles) if r == Role.DECODE and ev.evaluate(state.groups[i]).decode]
    out_p: dict[int, float] = {}
    plans: list[RoutePlan] = []
    for (i, j), f in flow.flows.items():
        if f <= 0:
            continue
        pi, di = pos[p_state[i]], pos[d_state[j]]
        out_p[pi] = out_p.get(pi, 0.0) + f
        r = routes.route(state.groups[p_state[i]], perfs[pi], state.groups[d_state[j]], perfs[di])
        plans.append(RoutePlan(groups[pi].id, groups[di].id, f, f * scale,
                               f * scale * routes.kv_bytes / 1e9, r.transfer_s * 1e3))
        groups[pi].load_rps += f * scale
        groups[di].load_rps += f * scale
    for r in plans:
        r.weight = r.weight / out_p[int(r.prefill[1:])]
    return plans


def _add_route_latency(ev: GroupEvaluator, route_plans: list[RoutePlan], placed: _Placed, latency: _Latency) -> None:
    """TTFT along a route: prefill latency, the queue wait at the prefill group's load, KV transfer, one step
    at the decode group's running batch; TPOT: that step."""
    tpot: dict[int, float] = {}
    for r in route_plans:
        pi, di = int(r.prefill[1:]), int(r.decode[1:])
        if di not in tpot:
            tpot[di] = tpot_at_load(ev, placed.gpu_groups[di], placed.perfs[di], placed.groups[di].load_rps)
        found = route_latency(ev, (placed.gpu_groups[pi], placed.perfs[pi]), placed.groups[pi].load_rps,
                              r.transfer_ms / 1e3, tpot[di])
        latency.add(r.rate_rps, found)
