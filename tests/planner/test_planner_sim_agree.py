"""One cost model: the planner's plan and the simulator's replay of it predict the same latencies at low load."""

import pytest

from loadtest.workload import PlannedRequest
from planner.core.solver import solve
from planner.sim.costs import AnalyticCosts
from planner.sim.from_plan import fleet_from_plan
from planner.sim.simulator import simulate

from tests.planner.planner_factories import make_cluster

PROMPT, OUTPUT = 1024, 128


@pytest.mark.parametrize("nodes", [
    [{"name": "h100", "gpu_type": "H100", "num_gpus": 8}],
    [{"name": "a100", "gpu_type": "A100-80G", "num_gpus": 4}, {"name": "l40s", "gpu_type": "L40S", "num_gpus": 8}],
])
def test_solve_and_simulate_agree_at_low_load(nodes):
    cluster = make_cluster(nodes=nodes, model="Llama-2-13B", workload={
        "input_tokens_mean": PROMPT, "output_tokens_mean": OUTPUT, "arrival_rate_rps": 0.05,
        "slo": {"ttft_ms": 2000, "tpot_ms": 100}})
    plan = solve(cluster, mode="disaggregated", time_limit_s=3)
    fleet = fleet_from_plan(plan, cluster)
    # Far apart: every request runs alone, as the plan's prediction at 0.05 req/s assumes.
    reqs = [PlannedRequest(i, i * 30.0, PROMPT, OUTPUT) for i in range(20)]
    recs = simulate(fleet, reqs, AnalyticCosts(cluster.model))
    assert all(r.success for r in recs)
    ttft_ms = sum(r.ttft_s for r in recs) / len(recs) * 1e3
    tpot_ms = sum(r.tpot_s for r in recs) / len(recs) * 1e3
    assert ttft_ms == pytest.approx(plan.predicted.ttft_ms, rel=0.03)
    assert tpot_ms == pytest.approx(plan.predicted.tpot_ms, rel=0.03)
    assert plan.predicted.slo_attainment == 1.0  # every route meets both SLOs (a rate-weighted mean of 1s)


def test_a_cluster_of_its_own_gpu_types_and_overrides_is_simulated_on_them():
    """A lab's types (or a catalog override) exist only in the cluster file: the simulator must use them."""
    cluster = make_cluster(
        nodes=[{"name": "a", "gpu_type": "MINE", "num_gpus": 2}, {"name": "b", "gpu_type": "H100", "num_gpus": 8}],
        model="Llama-2-13B",
        catalog={"MINE": {"peak_bf16_tflops": 100, "memory_gib": 80, "memory_bandwidth_gb_per_s": 1000,
                          "price_per_hour": 1, "intra_node_bandwidth_gb_per_s": 50},
                 "H100": {"cost_form": "roofline", "mfu": 0.2}},
        workload={"input_tokens_mean": PROMPT, "output_tokens_mean": OUTPUT, "slo": {"ttft_ms": 2000, "tpot_ms": 100}})
    catalog = cluster.catalog
    assert catalog.resolve("MINE", "t").peak_bf16_tflops == 100 and catalog.resolve("H100", "t").mfu == 0.2
    plan = solve(cluster, mode="disaggregated", time_limit_s=3)
    fleet_from_plan(plan, cluster)  # resolves every stage's type
