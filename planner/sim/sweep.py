"""Throughput at SLO: the highest request rate a plan serves with the SLOs met.

The trace is replayed at `rate_scale` times its own speed; SLO attainment
(share of requests meeting both TTFT and TPOT SLOs, failures counted as
misses) falls as the scale grows. `max_rate_at_slo` finds, by bisection, the
largest scale whose attainment stays at or above the target (90 % by default,
as DistServe reports), and returns the offered rate there in requests/s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from common.traces import TraceRequest
from loadtest.metrics import SLO
from loadtest.report import build_result
from loadtest.workload import WorkloadConfig, build_workload, offered_rate_rps
from planner.sim.simulator import SimConfig, simulate_with_counters
from planner.sim.types import SimCosts, SimFleet


@dataclass(slots=True)
class SweepPoint:
    rate_scale: float
    rate_rps: float
    result: dict


def run_at(fleet: SimFleet, trace: list[TraceRequest], costs: SimCosts, slo: SLO, wcfg: WorkloadConfig,
           rate_scale: float, routing: str = "plan", cfg: SimConfig | None = None) -> SweepPoint:
    """One run at `rate_scale`; `cfg` (else the defaults) with `routing` and no per-token gaps."""
    workload = build_workload(replace(wcfg, arrival="trace", rate_scale=rate_scale), trace)
    cfg = replace(cfg or SimConfig(), keep_itls=False, routing=routing)
    records, counters = simulate_with_counters(fleet, workload, costs, cfg)
    result = build_result(records, slo, {"source": "simulation", "fleet": fleet.name, "rate_scale": rate_scale},
                          per_request=False)
    result.pop("timeline", None)
    result.update(counters.to_json())
    return SweepPoint(rate_scale, offered_rate_rps(workload) or 0.0, result)


def max_rate_at_slo(fleet: SimFleet, trace: list[TraceRequest], costs: SimCosts, slo: SLO, wcfg: WorkloadConfig,
                    target: float = 0.9, lo: float = 0.05, hi: float = 64.0, iterations: int = 12,
                    routing: str = "plan", cfg: SimConfig | None = None) -> SweepPoint | None:
    """The best point with attainment >= target (None when even `lo` misses it)."""
    best = None
    point = run_at(fleet, trace, costs, slo, wcfg, lo, routing, cfg)
    if point.result["slo_attainment"] < target:
        return None
    best = point
    top = run_at(fleet, trace, costs, slo, wcfg, hi, routing, cfg)
    if top.result["slo_attainment"] >= target:
        return top
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5  # geometric: rates span orders of magnitude
        point = run_at(fleet, trace, costs, slo, wcfg, mid, routing, cfg)
        if point.result["slo_attainment"] >= target:
            best, lo = point, mid
        else:
            hi = mid
        if hi / lo < 1.02:
            break
    return best
