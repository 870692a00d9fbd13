"""The simulator on real plans (planner.solve -> plan.json -> SimFleet), baselines, sweep and CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sim_baselines import MeanLengths, colocated_plan, decode_batch, distserve_plan
from common.plan import load_plan
from common.traces import TraceRequest
from loadtest.metrics import SLO
from loadtest.workload import PlannedRequest, WorkloadConfig
from planner.sim.build import make_group, make_route
from planner.sim.costs import AnalyticCosts
from planner.sim.from_plan import fleet_from_plan
from planner.sim.simulator import simulate
from planner.sim.sweep import max_rate_at_slo
from planner.core.costmodel import Stage
from planner.sim.types import SimFleet, SimGroup, SimRoute
from planner.spec.catalog import default_catalog
from planner.spec.cluster import parse_cluster
from planner.spec.model import model_preset

REPO = Path(__file__).resolve().parents[2]

CLUSTER = {
    "schema": "hexserve.cluster", "schema_version": 1, "name": "sim-test",
    "fleet": {"nodes": [{"name": "h100", "gpu_type": "H100", "num_gpus": 8},
                        {"name": "l40s", "gpu_type": "L40S", "num_gpus": 8}]},
    "network": {"inter_node": {"bandwidth_gb_per_s": 25, "latency_us": 15}},
    "model": {"preset": "Llama-2-13B"},
    "workload": {"input_tokens_mean": 512, "output_tokens_mean": 128, "slo": {"ttft_ms": 1000, "tpot_ms": 80}},
}


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    from planner.core.solver import solve

    cluster = parse_cluster(CLUSTER, base_dir=REPO)
    plan = solve(cluster, mode="disaggregated", time_limit_s=3)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.write(path)
    return cluster, path


def test_plan_becomes_a_fleet_the_simulator_serves(solved):
    cluster, path = solved
    plan = load_plan(path)
    fleet = fleet_from_plan(plan, cluster)
    assert [g.name for g in fleet.groups] == [g.id for g in plan.groups]
    assert {g.role for g in fleet.groups} == {"prefill", "decode"}
    for g, pg in zip(fleet.groups, plan.groups):
        assert sum(s.layers for s in g.stages) == 40 and g.num_gpus == len(pg.gpus)
    assert all(r.weight > 0 and r.kv_seconds_per_token > 0 for r in fleet.routes)
    # The simulator's per-group costs agree with the planner's own latency estimates.
    costs = AnalyticCosts(model_preset("Llama-2-13B"))
    w = cluster.workload
    for g, pg in zip(fleet.groups, plan.groups):
        if g.role == "prefill":
            lat, _ = costs.prefill_batch_s(g, int(w.input_mean), int(w.input_sq_mean))
            assert lat * 1e3 == pytest.approx(pg.latency_ms, rel=0.05)
    reqs = [PlannedRequest(i, i * 0.1, 512, 128) for i in range(50)]
    recs = simulate(fleet, reqs, costs)
    assert all(r.success for r in recs)
    routes = {r.route for r in recs}
    assert len(routes) >= min(2, len(fleet.routes))


def test_cli_simulate_writes_harness_schema(solved, tmp_path):
    cluster, path = solved
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:15:{10 + i // 10:02d}.{i % 10}000000,{200 + 10 * i},{20 + i}" for i in range(40)]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "sim"
    proc = subprocess.run([sys.executable, "-m", "planner", "simulate", str(path), "--trace", str(trace),
                           "--out", str(out), "--no-plots"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "sim.json").read_text())
    assert res["source"] == "simulation" and res["completed"] == 40
    assert res["input_lens"][:2] == [200, 210] and res["slo"]["ttft_ms"] == 1000.0
    assert "mean_ttft_ms" in res and "p99_tpot_ms" in res


def _llama13():
    cat, model = default_catalog(), model_preset("Llama-2-13B")
    return model, [make_group(f"g{i}", "decode", model, [(cat.resolve("A100-80G", "g"), 1, 40)]) for i in range(4)]


def test_decode_batch_respects_tpot_slo_and_kv():
    model, groups = _llama13()
    costs = AnalyticCosts(model)
    tight = decode_batch(groups[0], costs, MeanLengths(512, 128, 0.03))
    loose = decode_batch(groups[0], costs, MeanLengths(512, 128, 1.0))
    assert 1 <= tight < loose
    assert costs.decode_step_s(groups[0], tight, int(tight * 576)) <= 0.03
    assert loose <= groups[0].kv_capacity_tokens // 640


def test_distserve_and_colocated_baselines():
    model, groups = _llama13()
    costs = AnalyticCosts(model)
    w = MeanLengths(512, 128, 0.08)
    ds = distserve_plan(groups, costs, w, lambda p, d: make_route(model, p, d, 1.0, 25.0))
    k = ds.notes["prefill_groups"]
    assert 1 <= k <= 3 and len(ds.routes) == k * (4 - k)
    assert sum(r.weight for r in ds.routes) == pytest.approx(1.0)
    colo = colocated_plan(groups, costs, w)
    assert {g.role for g in colo.groups} == {"colocated"} and len(colo.routes) == 4


class _Const:
    def prefill_batch_s(self, group, sum_tokens, sum_sq_tokens, own_step=False):
        return 0.1, 0.1

    def decode_step_s(self, group, batch, sum_context_tokens):
        return 0.001


def test_max_rate_at_slo_finds_the_prefill_bound():
    stage = Stage(default_catalog().resolve("H100", "g"), 1, 1, True, True, 1e11, 1e-6)
    fleet = SimFleet("one", [SimGroup("p", "prefill", (stage,), max_prefill_tokens=100),
                             SimGroup("d", "decode", (stage,))], [SimRoute("p", "d", 1.0, 0.0)])
    trace = [TraceRequest(float(i), 100, 5) for i in range(400)]
    best = max_rate_at_slo(fleet, trace, _Const(), SLO(ttft_ms=1000, tpot_ms=50),
                           WorkloadConfig(max_requests=400, duration_s=1e9), target=0.9)
    # One prompt per 0.1 s pass: the prefill group serves at most 10 req/s.
    assert best is not None and 6.0 < best.rate_rps <= 10.5
    assert best.result["slo_attainment"] >= 0.9
