"""Right-sizing checked in the simulator: a right-sized plan is recommended only once it holds on the trace.

The planner's queue reads a trace's burstiness as one number (the squared
coefficient of variation of its arrival gaps, planner.core.queueing) and
right-sizing picks GPUs from templates that cannot see routes, so a plan
sized on the model's capacity plus a fixed headroom can still miss its SLOs
on the trace itself. `checked_right_size` simulates each right-sized
plan on the workload's own trace at the workload's rate (first
`max_requests` requests, the router's routing policy) and, while fewer than
`target` of the requests meet both SLOs, sizes again with 1.5x the capacity
margin, until the plan holds or the whole fleet is planned; then it halves
the gap to the last margin that failed twice, keeping the cheapest plan that
held. A workload
given as means has no trace to hold the plan against: its plan is returned
unchecked, and says so.
"""

from __future__ import annotations

from common.plan import Plan
from common.traces import TraceRequest, load_trace
from loadtest.metrics import SLO
from loadtest.workload import WorkloadConfig
from planner.core.right_size import DEFAULT_HEADROOM, right_size
from planner.sim.costs import AnalyticCosts
from planner.sim.from_plan import fleet_from_plan
from planner.sim.sweep import run_at
from planner.spec.cluster import Cluster
from planner.spec.model import model_from_fields

DEFAULT_TARGET = 0.9  # SLO attainment, as the fleet benchmarks count a rate served
MAX_ROUNDS = 6
MARGIN_STEP = 1.5
BISECTIONS = 2


def workload_trace(cluster: Cluster, max_requests: int = 2000) -> list[TraceRequest] | None:
    """The first requests of the trace the workload was read from (None: the workload gives means)."""
    workload = cluster.workload
    if not workload.trace_path:
        return None
    return load_trace(workload.trace_path, workload.trace_format)[:max_requests]


def simulated_attainment(plan: Plan, cluster: Cluster, trace: list[TraceRequest] | None = None) -> float | None:
    """Share of the trace's requests (default: `workload_trace`'s) meeting both SLOs at the workload's
    rate (None: no trace)."""
    workload = cluster.workload
    trace = workload_trace(cluster) if trace is None else trace
    if not trace:
        return None
    span = trace[-1].arrival_s - trace[0].arrival_s if len(trace) > 1 else 0.0
    native = (len(trace) - 1) / span if span > 0 else None
    scale = workload.arrival_rate_rps / native if native and workload.arrival_rate_rps else 1.0
    slo = SLO(workload.ttft_slo_s * 1e3, workload.tpot_slo_s * 1e3)
    point = run_at(fleet_from_plan(plan, cluster), trace, AnalyticCosts(model_from_fields(plan.model, "plan.model")),
                   slo, WorkloadConfig(arrival="trace", max_requests=len(trace), duration_s=1e9), scale)
    return float(point.result["slo_attainment"])


def checked_right_size(cluster: Cluster, headroom: float = DEFAULT_HEADROOM, mode: str = "auto", seed: int = 0,
                       time_limit_s: float | None = None, target: float = DEFAULT_TARGET) -> Plan:
    """`right_size`, with the margin raised until the plan holds on the trace in simulation, then
    narrowed (BISECTIONS halvings between the last margin that failed and the first that held)."""
    checks: list[dict] = []
    trace = workload_trace(cluster)  # read once: every attempt replays the same requests

    def attempt(margin: float) -> tuple[Plan, float | None]:
        plan = right_size(cluster, headroom=margin, mode=mode, seed=seed, time_limit_s=time_limit_s)
        attainment = simulated_attainment(plan, cluster, trace) if trace else None
        checks.append({"headroom": round(margin, 4), "serving_cost_per_hour": plan.solver["right_sizing"][
            "serving_cost_per_hour"], "simulated_slo_attainment": None if attainment is None else round(attainment, 4)})
        return plan, attainment

    failed, margin = None, headroom
    plan, attainment = attempt(margin)
    for _ in range(MAX_ROUNDS - 1):
        if attainment is None or attainment >= target or not plan.solver["right_sizing"]["meets_target"]:
            break
        failed, margin = margin, (1 + margin) * MARGIN_STEP - 1
        plan, attainment = attempt(margin)
    held = attainment is not None and attainment >= target
    for _ in range(BISECTIONS if held and failed is not None else 0):
        middle = (failed + margin) / 2
        trial, trial_attainment = attempt(middle)
        if trial_attainment is not None and trial_attainment >= target:
            plan, attainment, margin = trial, trial_attainment, middle
        else:
            failed = middle
    info = plan.solver["right_sizing"]
    info.update(simulation_target=target, simulation_checks=checks,
                simulated_slo_attainment=None if attainment is None else round(attainment, 4),
                holds_in_simulation=None if attainment is None else attainment >= target)
    return plan
