"""What a plan predicts at the load it serves: the decode batch it runs, TPOT, TTFT per prompt length,
and the share of requests that meet both SLOs.

The search sizes decode groups at their largest batch (their capacity); at a
lower load a group runs fewer requests and its steps are shorter. The running
batch follows Little's law: ``B = load * output_mean * TPOT(B)`` (requests in
the group = arrival rate x time in it), found by bisection since TPOT grows
with B. A request's TTFT along a route is its prompt's prefill latency, the
queueing wait at the prefill group's load (Kingman's, with the workload's
arrival burstiness: planner.core.queueing), its KV transfer (proportional to the
prompt) and one decode step; its TPOT is the decode step at the running
batch. Every time comes from the same ``costmodel.prefill_pass`` /
``decode_step`` the simulator calls, so plan and simulation agree at low load.

SLO attainment is the share of the workload's prompt-length percentiles
(``Workload.input_quantiles``) whose TTFT meets the SLO, on a route whose
TPOT meets its SLO, weighted by the routes' rates.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.core import costmodel as cm
from planner.core import queueing
from planner.core.groups import Group
from planner.core.perf import PhasePerf
from planner.core.strategy import GroupEvaluator

_BISECTION_STEPS = 40


@dataclass(frozen=True, slots=True)
class RouteLatency:
    """Predicted latencies of requests on one prefill -> decode route at its load."""

    ttft_mean_s: float  # an average prompt
    ttft_tail_s: float  # the SLO percentile's prompt
    tpot_s: float
    slo_attainment: float  # share of requests meeting both SLOs


def group_stages(ev: GroupEvaluator, group: Group, perf: PhasePerf) -> list[cm.Stage]:
    """The cost model's stages of a group running ``perf``'s strategy."""
    return ev.stages(group, perf.tp, ev.slots(group, perf.tp), [s.num_layers for s in perf.stages])


def running_batch(ev: GroupEvaluator, stages: list[cm.Stage], perf: PhasePerf, load_rps: float,
                  stretch: float = 1.0) -> float:
    """Requests a decode (or colocated) group runs on average at ``load_rps``: ``B = load * out * TPOT(B)``.

    ``stretch`` lengthens each step (colocated: prefill takes ``rho`` of the time, steps last 1 / (1 - rho)).
    """
    wl = ev.workload
    if load_rps <= 0:
        return 0.0

    def excess(b: float) -> float:
        step = cm.decode_step(ev.model, stages, max(b, 1.0), wl.decode_context_mean) * stretch
        return b - load_rps * wl.output_mean * step

    lo, hi = 0.0, float(max(perf.batch, 1))
    if excess(hi) <= 0:  # at or beyond capacity: the group runs full
        return hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return hi


def tpot_at_load(ev: GroupEvaluator, group: Group, perf: PhasePerf, load_rps: float) -> float:
    """TPOT of a decode group at ``load_rps``: one step at the batch it runs (at least the request itself)."""
    stages = group_stages(ev, group, perf)
    batch = running_batch(ev, stages, perf, load_rps)
    return cm.decode_step(ev.model, stages, max(batch, 1.0), ev.workload.decode_context_mean)


def prefill_wait_s(perf: PhasePerf, load_rps: float) -> float:
    """The mean wait at a prefill group's queue at ``load_rps``."""
    return queueing.wait_s(load_rps * perf.service_s, perf.service_s, perf.queue_variability)


def route_latency(ev: GroupEvaluator, prefill: tuple[Group, PhasePerf], prefill_load_rps: float,
                  transfer_mean_s: float, tpot_s: float) -> RouteLatency:
    """TTFT at the mean and tail prompt, and SLO attainment, along one route (see the module docstring)."""
    wl = ev.workload
    group, perf = prefill
    stages = group_stages(ev, group, perf)
    wait = prefill_wait_s(perf, prefill_load_rps)

    def ttft(tokens: float, sq_tokens: float, hit: float = 0.0) -> float:
        # A hit fraction `hit` of the prompt is cached: only the rest is computed; all of its KV crosses.
        latency = cm.prefill_pass(ev.model, stages, tokens * (1 - hit), sq_tokens * (1 - hit * hit))[0]
        return latency + wait + transfer_mean_s * tokens / wl.input_mean + tpot_s

    lengths = wl.input_quantiles or (wl.input_mean,)
    meets = sum(ttft(s, s * s) <= wl.ttft_slo_s for s in lengths) / len(lengths) if tpot_s <= wl.tpot_slo_s else 0.0
    tail = wl.input_tail
    return RouteLatency(ttft(wl.input_mean, wl.input_sq_mean, wl.prefix_hit_fraction), ttft(tail, tail * tail),
                        tpot_s, meets)


def colocated_latency(ev: GroupEvaluator, group: Group, perf: PhasePerf, load_rps: float) -> RouteLatency:
    """A colocated group at ``load_rps``: prefill takes ``rho`` of its time and stretches decode steps."""
    wl = ev.workload
    stages = group_stages(ev, group, perf)
    rho = min(load_rps * perf.service_s, 0.999)
    stretch = 1 / (1 - rho)
    batch = running_batch(ev, stages, perf, load_rps, stretch)
    step = cm.decode_step(ev.model, stages, max(batch, 1.0), wl.decode_context_mean)
    wait = queueing.wait_s(rho, perf.service_s, perf.queue_variability)

    def ttft(tokens: float, sq_tokens: float, hit: float = 0.0) -> float:
        return cm.prefill_pass(ev.model, stages, tokens * (1 - hit), sq_tokens * (1 - hit * hit))[0] + wait + step

    lengths = wl.input_quantiles or (wl.input_mean,)
    tpot = step * stretch
    meets = sum(ttft(s, s * s) <= wl.ttft_slo_s for s in lengths) / len(lengths) if tpot <= wl.tpot_slo_s else 0.0
    tail = wl.input_tail
    return RouteLatency(ttft(wl.input_mean, wl.input_sq_mean, wl.prefix_hit_fraction), ttft(tail, tail * tail),
                        tpot, meets)
