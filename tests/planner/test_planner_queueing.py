"""Queueing at prefill: Kingman's wait with the workload's arrival burstiness (planner.core.queueing)."""

from pathlib import Path

import pytest

from planner.core import queueing
from planner.core.solver import solve
from planner.spec.errors import PlanInputError

from tests.planner.planner_factories import make_cluster

A100_16 = [{"gpu_type": "A100-80G", "num_gpus": 8, "count": 2}]
SLO = {"ttft_ms": 1500, "tpot_ms": 100}


def test_poisson_arrivals_and_one_prompt_length_give_the_md1_wait():
    service, rho = 0.1, 0.6
    v = queueing.variability(1.0, queueing.service_cv2(0.0, (1000, 1000), (0.3, 0.3)))
    assert v == queueing.MD1_VARIABILITY
    assert queueing.wait_s(rho, service, v) == pytest.approx(rho * service / (2 * (1 - rho)))  # Pollaczek-Khinchine
    assert queueing.wait_s(rho, service, 4 * v) == pytest.approx(4 * queueing.wait_s(rho, service, v))
    assert queueing.wait_s(1.5, service, v) < float("inf")  # held just below saturation


@pytest.mark.parametrize("v", [0.5, 1.0, 20.0])
def test_queue_capacity_meets_the_latency_budget(v):
    service, latency, budget = 0.1, 0.3, 1.3
    rate = queueing.capacity_rps(service, latency, budget, v)
    assert 0 < rate * service < 1
    assert latency + queueing.wait_s(rate * service, service, v) == pytest.approx(budget)
    assert queueing.capacity_rps(service, 2.0, 1.0, v) == 0.0


def test_service_spread_follows_the_prompt_spread():
    # Service proportional to the prompt: its CV is the prompt's; with a fixed part, less.
    assert queueing.service_cv2(0.8, (1000, 3000), (0.1, 0.3)) == pytest.approx(0.8)
    assert queueing.service_cv2(0.8, (1000, 3000), (0.2, 0.4)) == pytest.approx(0.8 * 0.25)
    assert queueing.service_cv2(0.8, (1000, 1000), (0.1, 0.1)) == 0.0


def _trace(path: Path, gaps_s: list[float]) -> Path:
    """An Azure-format trace, 1000-token prompts, with these gaps between arrivals."""
    rows, t = ["TIMESTAMP,ContextTokens,GeneratedTokens"], 0.0
    for gap in gaps_s:
        t += gap
        rows.append(f"2023-11-16 18:{int(t // 60):02d}:{t % 60:09.6f},1000,200")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_trace_s_burstiness_is_read_and_can_be_overridden(tmp_path):
    regular = _trace(tmp_path / "regular.csv", [0.25] * 400)
    bursty = _trace(tmp_path / "bursty.csv", ([0.0125] * 19 + [4.7625]) * 20)  # same 4 req/s, in bursts of 20
    wl = {"slo": SLO}
    assert make_cluster(workload={"trace": str(regular), **wl}).workload.arrival_cv2 == pytest.approx(0, abs=1e-6)
    bursty_wl = make_cluster(workload={"trace": str(bursty), **wl}).workload
    assert bursty_wl.arrival_cv2 > 10 and bursty_wl.arrival_rate_rps == pytest.approx(4, rel=0.02)
    assert make_cluster(workload={"trace": str(bursty), "burstiness": 0.5, **wl}).workload.arrival_cv2 == 2.0
    means = make_cluster(workload={"input_tokens_mean": 1000, "output_tokens_mean": 200, "burstiness": 0.25, **wl})
    assert means.workload.arrival_cv2 == 4.0
    for bad in (0, -1, "bursty", True):
        with pytest.raises(PlanInputError, match=r"workload\.burstiness"):
            make_cluster(workload={"input_tokens_mean": 1000, "output_tokens_mean": 200, "burstiness": bad, **wl})


def test_a_bursty_trace_changes_the_plan(tmp_path):
    """Same rate and lengths, arrivals in bursts: a prompt group takes fewer requests each within
    the TTFT SLO, so the plan changes and predicts less capacity; the burstiness is in the plan."""
    plans = {}
    for name, gaps in (("poisson-like", [0.25] * 400), ("bursty", ([0.0125] * 19 + [4.7625]) * 20)):
        cluster = make_cluster(nodes=A100_16, workload={"trace": str(_trace(tmp_path / f"{name}.csv", gaps)),
                                                       "slo": SLO})
        plans[name] = solve(cluster, time_limit_s=3)
    calm, bursty = plans["poisson-like"], plans["bursty"]
    shape = {k: sorted((g.role.value, g.tp, g.pp, len(g.gpus)) for g in p.groups) for k, p in plans.items()}
    assert shape["bursty"] != shape["poisson-like"]
    assert bursty.predicted.throughput_rps < calm.predicted.throughput_rps
    assert bursty.workload["arrival_cv2"] > 10 and calm.workload["arrival_cv2"] == 0
