"""Plans to compare against, built for the simulator: DistServe-like and HexGen-like.

- `distserve_plan`: DistServe's setting, one GPU type: identical groups, the
  prefill:decode count that balances the two phases' capacities, every
  prefill group routed to every decode group by capacity.
- `colocated_plan`: HexGen's setting (heterogeneous, no disaggregation):
  every group runs both phases; requests are weighted by each group's
  colocated capacity.
- `balanced_disaggregated_plan`: a simple heterogeneous P/D split without the
  planner: each group takes the role where it adds the most to
  min(prefill capacity, decode capacity) - a greedy stand-in used only when
  `planner solve` is unavailable, and a sanity check for it.

Capacities are steady-state estimates from the same `SimCosts` the simulator
uses, for the workload's mean lengths and the TPOT SLO.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from common.roles import Role
from planner.sim.types import SimCosts, SimFleet, SimGroup, SimRoute


@dataclass(frozen=True, slots=True)
class MeanLengths:
    input_tokens: float
    output_tokens: float
    tpot_slo_s: float


def decode_batch(group: SimGroup, costs: SimCosts, w: MeanLengths) -> int:
    """Largest batch that fits the KV cache and keeps a step within the TPOT SLO."""
    per_req = w.input_tokens + w.output_tokens
    limit = max(1, min(group.max_batch_size, int(group.kv_capacity_tokens / per_req)))
    ctx = w.input_tokens + w.output_tokens / 2
    best = 1
    lo, hi = 1, limit
    while lo <= hi:
        mid = (lo + hi) // 2
        if costs.decode_step_s(group, mid, int(mid * ctx)) <= w.tpot_slo_s:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def prefill_capacity_rps(group: SimGroup, costs: SimCosts, w: MeanLengths) -> float:
    n = max(1, int(group.max_prefill_tokens // max(w.input_tokens, 1)))
    s = int(w.input_tokens)
    _, busy = costs.prefill_batch_s(group, n * s, n * s * s, own_step=True)
    return n / busy


def decode_capacity_rps(group: SimGroup, costs: SimCosts, w: MeanLengths) -> float:
    b = decode_batch(group, costs, w)
    step = costs.decode_step_s(group, b, int(b * (w.input_tokens + w.output_tokens / 2)))
    return b / (step * w.output_tokens)


def colocated_capacity_rps(group: SimGroup, costs: SimCosts, w: MeanLengths) -> float:
    # Each request costs its share of prefill time plus its decode steps' share.
    p = 1.0 / prefill_capacity_rps(group, costs, w)
    d = 1.0 / decode_capacity_rps(group, costs, w)
    return 1.0 / (p + d)


def _as(group: SimGroup, role: Role) -> SimGroup:
    return replace(group, role=role)


def colocated_plan(groups: list[SimGroup], costs: SimCosts, w: MeanLengths, name: str = "colocated") -> SimFleet:
    gs = [_as(g, Role.COLOCATED) for g in groups]
    routes = [SimRoute(g.name, g.name, colocated_capacity_rps(g, costs, w), 0.0) for g in gs]
    return SimFleet(name, gs, routes, notes={"kind": "colocated"})


def _routes(prefill, decode, costs, w, kv_route) -> list[SimRoute]:
    """All-to-all routes, weight = share of prefill capacity x share of decode capacity."""
    cp = {g.name: prefill_capacity_rps(g, costs, w) for g in prefill}
    cd = {g.name: decode_capacity_rps(g, costs, w) for g in decode}
    sp, sd = sum(cp.values()), sum(cd.values())
    out = []
    for p in prefill:
        for d in decode:
            base = kv_route(p, d)
            out.append(replace(base, weight=(cp[p.name] / sp) * (cd[d.name] / sd)))
    return out


def distserve_plan(groups: list[SimGroup], costs: SimCosts, w: MeanLengths, kv_route, name: str = "distserve") -> SimFleet:
    """Identical groups; the prefill count k maximising min(k * cap_p, (n - k) * cap_d)."""
    n = len(groups)
    if n < 2:
        raise ValueError("a disaggregated plan needs at least 2 groups")
    cap_p = prefill_capacity_rps(groups[0], costs, w)
    cap_d = decode_capacity_rps(groups[0], costs, w)
    k = max(range(1, n), key=lambda k: min(k * cap_p, (n - k) * cap_d))
    prefill = [_as(g, Role.PREFILL) for g in groups[:k]]
    decode = [_as(g, Role.DECODE) for g in groups[k:]]
    return SimFleet(name, prefill + decode, _routes(prefill, decode, costs, w, kv_route),
                    notes={"kind": "distserve", "prefill_groups": k, "decode_groups": n - k})


def balanced_disaggregated_plan(groups: list[SimGroup], costs: SimCosts, w: MeanLengths, kv_route,
                                name: str = "balanced-pd") -> SimFleet:
    """Greedy: groups sorted by prefill/decode capacity ratio; split where min(P, D) is largest."""
    ratio = sorted(groups, key=lambda g: -prefill_capacity_rps(g, costs, w) / decode_capacity_rps(g, costs, w))
    best_k, best = 1, -1.0
    for k in range(1, len(ratio)):
        p = sum(prefill_capacity_rps(g, costs, w) for g in ratio[:k])
        d = sum(decode_capacity_rps(g, costs, w) for g in ratio[k:])
        if min(p, d) > best:
            best_k, best = k, min(p, d)
    prefill = [_as(g, Role.PREFILL) for g in ratio[:best_k]]
    decode = [_as(g, Role.DECODE) for g in ratio[best_k:]]
    return SimFleet(name, prefill + decode, _routes(prefill, decode, costs, w, kv_route),
                    notes={"kind": "balanced-pd", "estimated_capacity_rps": best})
