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
5. ``build_plan`` turns the winner into the versioned plan the router reads.

``mode="auto"`` runs the disaggregated and the colocated search and keeps the
one with more throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from planner.core.budget import choose_gpus
from planner.core.exact import solve_exact
from planner.core.flow import RouteTable
from planner.core.partition import minimal_groups, partition
from planner.core.refine import DISAGGREGATED, Search, State
from planner.core.strategy import COLOCATED, DECODE, PREFILL, Group, GroupEvaluator
from planner.spec.cluster import Cluster
from planner.spec.errors import InfeasibleFleetError, PlanInputError

MODES = (DISAGGREGATED, COLOCATED, "auto")
GRANULARITIES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
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
        if search.mode != COLOCATED:
            states.append(self._per_type_state(search))
        return states

    def _per_type_state(self, search: Search) -> State:
        """Minimal groups, each GPU type wholly prefill or decode: the best such split starts a search too."""
        groups = minimal_groups(self.cluster, self.evaluator)
        types = sorted({self.cluster.nodes[g[0][0]].gpu_type for g in groups})
        best: State | None = None
        best_value = -1.0
        for mask in range(1, 2 ** len(types) - 1) if len(types) > 1 else []:
            prefill_types = {t for k, t in enumerate(types) if mask >> k & 1}
            roles = [PREFILL if self.cluster.nodes[g[0][0]].gpu_type in prefill_types else DECODE for g in groups]
            state = State(list(groups), roles, {})
            value, _ = search.evaluate(state)
            if value > best_value:
                best, best_value = state, value
        return best if best is not None else search.assign_roles(groups)

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
        search = Search(self.evaluator, self.routes, mode, seed=seed, deadline=deadline)
        scored = []
        for idx, state in enumerate(self.initial_states(search, seed)):
            value, _ = search.evaluate(state)
            scored.append((value, idx, state))
        scored.sort(key=lambda t: (-t[0], t[1]))
        initial = scored[0][0] if scored else 0.0
        best_state, best_value = (scored[0][2], scored[0][0]) if scored else (State([], [], {}), 0.0)
        for _, _, state in scored[:starts]:
            refined, value = search.refine(state)
            if value > best_value * (1 + 1e-9):
                best_state, best_value = refined, value
            if search.out_of_time():
                break
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
        Planner(cluster).check_feasible()
        choice = choose_gpus(cluster, budget, time_limit_s=max(time_limit_s / 3, 1.0))
        cluster = cluster.subset(choice.node_counts)
        budget_info = {"budget_per_hour": budget, "rented": choice.counts, "rented_cost_per_hour": round(choice.cost_per_hour, 4),
                       "estimated_rps": round(choice.estimated_rps, 6), "status": choice.status}
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
    return build_plan(cluster, planner, best.state, best.mode, info)


def build_plan(cluster: Cluster, planner: Planner, state: State, mode: str, info: dict) -> Plan:
    """Turn a solved state into the plan document (GPU names, stages, routes, predictions)."""
    ev, model, wl = planner.evaluator, cluster.model, cluster.workload
    search = Search(ev, planner.routes, mode)
    value, flow = search.evaluate(state)
    next_gpu = {n.index: 0 for n in cluster.nodes}
    groups: list[GroupPlan] = []
    perfs = []
    plan_pos: dict[int, int] = {}  # state index -> position in the plan
    order = sorted(range(len(state.groups)), key=lambda i: ({PREFILL: 0, DECODE: 1}.get(state.roles[i], 0), state.groups[i], i))
    for i in order:
        group, role = state.groups[i], state.roles[i]
        perf = ev.perf(group, role)
        if perf is None:  # cannot serve this role: its GPUs go unused
            continue
        gpus_by_part = []
        for node, count in group:
            start = next_gpu[node]
            next_gpu[node] += count
            gpus_by_part.append([f"{cluster.nodes[node].name}:{k}" for k in range(start, start + count)])
        used = {p: 0 for p in range(len(group))}
        stages = []
        for st in perf.stages:
            gl = gpus_by_part[st.part][used[st.part]: used[st.part] + st.tp]
            used[st.part] += st.tp
            node = cluster.nodes[group[st.part][0]]
            stages.append(StagePlan(node.name, node.gpu_type, gl, st.tp, [st.first_layer, st.first_layer + st.num_layers]))
        types: dict[str, int] = {}
        for node, count in group:
            t = cluster.nodes[node].gpu_type
            types[t] = types.get(t, 0) + count
        plan_pos[i] = len(groups)
        perfs.append(perf)
        groups.append(GroupPlan(
            id=f"g{len(groups)}", role=role, gpus=[g for part in gpus_by_part for g in part], gpu_types=types,
            nodes=[cluster.nodes[n].name for n, _ in group], region=cluster.nodes[group[0][0]].region,
            tp=perf.tp, pp=perf.pp, layer_partition=[s.num_layers for s in perf.stages], stages=stages,
            capacity_rps=perf.capacity_rps, load_rps=0.0, batch=perf.batch, latency_ms=perf.latency_s * 1e3,
            service_ms=perf.service_s * 1e3, kv_budget_ms=perf.kv_budget_s * 1e3,
        ))
    unused = []
    for node in cluster.nodes:
        unused += [f"{node.name}:{k}" for k in range(next_gpu[node.index], node.num_gpus)]
    throughput = value
    load = min(wl.arrival_rate_rps, throughput) if wl.arrival_rate_rps else throughput
    scale = load / throughput if throughput > 0 else 0.0
    routes: list[RoutePlan] = []
    ttft_acc = tpot_acc = 0.0
    if mode == COLOCATED:
        for g, perf in zip(groups, perfs):
            g.load_rps = perf.capacity_rps * scale
            ttft_acc += g.load_rps * perf.ttft_s
            tpot_acc += g.load_rps * perf.latency_s
    elif flow is not None:
        # evaluate() lists prefill/decode groups in state order; map them to plan order.
        p_state = [i for i, r in enumerate(state.roles) if r == PREFILL and ev.evaluate(state.groups[i]).prefill]
        d_state = [i for i, r in enumerate(state.roles) if r == DECODE and ev.evaluate(state.groups[i]).decode]
        out_p: dict[int, float] = {}
        for (i, j), f in flow.flows.items():
            if f <= 0:
                continue
            pi, di = plan_pos[p_state[i]], plan_pos[d_state[j]]
            out_p[pi] = out_p.get(pi, 0.0) + f
            r = planner.routes.route(state.groups[p_state[i]], perfs[pi], state.groups[d_state[j]], perfs[di])
            routes.append(RoutePlan(groups[pi].id, groups[di].id, f, f * scale,
                                    f * scale * planner.routes.kv_bytes / 1e9, r.transfer_s * 1e3))
            groups[pi].load_rps += f * scale
            groups[di].load_rps += f * scale
        for r in routes:
            pi = int(r.prefill[1:])
            r.weight = r.weight / out_p[pi]
            pperf = perfs[pi]
            rho = min(groups[pi].load_rps * pperf.service_s, 0.999)
            wait = rho * pperf.service_s / (2 * (1 - rho))
            dperf = perfs[int(r.decode[1:])]
            ttft_acc += r.rate_rps * (pperf.latency_s + wait + r.transfer_ms / 1e3 + dperf.latency_s)
            tpot_acc += r.rate_rps * dperf.latency_s
    cost = cluster.price_per_hour
    tokens_per_s = throughput * wl.output_mean
    predicted = Predicted(
        throughput_rps=float(throughput),
        output_tokens_per_s=tokens_per_s,
        ttft_ms=ttft_acc / load * 1e3 if load > 0 else 0.0,
        tpot_ms=tpot_acc / load * 1e3 if load > 0 else 0.0,
        cost_per_hour=cost,
        tokens_per_dollar=tokens_per_s * 3600 / cost if cost > 0 else 0.0,
        load_rps=load,
        meets_arrival_rate=bool(throughput >= wl.arrival_rate_rps) if wl.arrival_rate_rps else None,
    )
    return Plan(mode=mode, cluster=cluster.name, model=model.to_json(), workload=wl.to_json(), groups=groups,
                routes=routes, unused_gpus=unused, predicted=predicted, solver=info)



def solve_exact_plan(cluster: Cluster, mode: str = DISAGGREGATED, time_limit_s: float = 60.0) -> Plan:
    """The certified optimum (small fleets only) as a plan, with the solver's bound."""
    if mode not in (DISAGGREGATED, COLOCATED):
        raise PlanInputError("mode", f"the exact solver takes mode {DISAGGREGATED!r} or {COLOCATED!r}, not {mode!r}")
    started = time.monotonic()
    planner = Planner(cluster)
    planner.check_feasible()
    result = solve_exact(cluster, mode, time_limit_s, planner.evaluator, planner.routes)
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
    return build_plan(cluster, planner, result.state, mode, info)
