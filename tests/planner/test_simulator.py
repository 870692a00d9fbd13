"""The plan simulator on hand-checkable fleets (constant costs) and on the analytical model."""

import pytest

from common.routing import Route, RoutePolicy
from loadtest.metrics import SLO
from loadtest.report import build_result
from loadtest.workload import PlannedRequest
from planner.sim.build import make_group, make_route, split_layers
from planner.sim.costs import AnalyticCosts, ProfileCosts
from planner.sim.simulator import SimConfig, simulate
from planner.core.costmodel import Stage
from planner.sim.types import SimFleet, SimGroup, SimRoute
from planner.spec.catalog import default_catalog
from planner.spec.model import model_preset

PREFILL_S, STEP_S, KV_S_PER_TOKEN = 0.1, 0.01, 0.001


class ConstCosts:
    """Prefill: 0.1 s per batch whatever its size; decode step: 0.01 s (+0.001 s per request)."""

    def __init__(self, per_request_s=0.0):
        self.per_request_s = per_request_s

    def prefill_batch_s(self, group, sum_tokens, sum_sq_tokens, own_step=False):
        return PREFILL_S, PREFILL_S

    def decode_step_s(self, group, batch, sum_context_tokens):
        return STEP_S + self.per_request_s * batch


def _stage():
    return Stage(default_catalog().resolve("H100", "gpu"), 1, 1, True, True, 1e11, 1e-6)


def _fleet(n_prefill=1, n_decode=1, weights=None, kv_capacity=1 << 30, max_prefill_tokens=8192, max_batch=256):
    groups = [SimGroup(f"p{i}", "prefill", (_stage(),), max_prefill_tokens=max_prefill_tokens)
              for i in range(n_prefill)]
    groups += [SimGroup(f"d{i}", "decode", (_stage(),), kv_capacity_tokens=kv_capacity, max_batch_size=max_batch)
               for i in range(n_decode)]
    routes = [SimRoute(f"p{i}", f"d{j}", 1.0, KV_S_PER_TOKEN)
              for i in range(n_prefill) for j in range(n_decode)]
    if weights:
        routes = [SimRoute(r.prefill, r.decode, w, r.kv_seconds_per_token) for r, w in zip(routes, weights)]
    return SimFleet("test", groups, routes)


def _req(i, t, inp=100, out=10):
    return PlannedRequest(i, t, inp, out)


def test_single_request_timing_is_the_sum_of_its_stages():
    (r,) = simulate(_fleet(), [_req(0, 1.0)], ConstCosts())
    assert r.success and r.route == "p0->d0"
    ttft = PREFILL_S + 100 * KV_S_PER_TOKEN + STEP_S
    assert r.ttft_s == pytest.approx(ttft)
    assert r.latency_s == pytest.approx(ttft + 9 * STEP_S)
    assert r.tpot_s == pytest.approx(STEP_S)
    assert len(r.itls_s) == 9 and r.output_tokens == 10


def test_prefill_queue_when_the_token_budget_forbids_batching():
    recs = simulate(_fleet(max_prefill_tokens=150), [_req(0, 0.0), _req(1, 0.0)], ConstCosts())
    # The second prompt waits one full prefill pass, then its own.
    assert recs[1].ttft_s - recs[0].ttft_s == pytest.approx(PREFILL_S, abs=1e-9)
    both = simulate(_fleet(max_prefill_tokens=200), [_req(0, 0.0), _req(1, 0.0)], ConstCosts())
    # Batched together: both finish prefill at once, and then share the route's link in turn.
    assert both[1].ttft_s - both[0].ttft_s == pytest.approx(100 * KV_S_PER_TOKEN, abs=2 * STEP_S)


def test_continuous_batching_shares_steps_and_costs_grow_with_batch():
    reqs = [_req(i, 0.0, out=20) for i in range(4)]
    alone = simulate(_fleet(), reqs[:1], ConstCosts(0.002))[0]
    together = simulate(_fleet(), reqs, ConstCosts(0.002))
    assert all(r.success for r in together)
    # Four in one batch: each step costs more, so TPOT rises but nobody waits for a whole request.
    assert max(r.tpot_s for r in together) > alone.tpot_s
    assert max(r.latency_s for r in together) < 4 * alone.latency_s


def test_kv_capacity_holds_requests_back_and_rejects_what_never_fits():
    recs = simulate(_fleet(kv_capacity=150), [_req(0, 0.0), _req(1, 0.0), _req(2, 0.0, inp=500)], ConstCosts())
    assert recs[0].success and recs[1].success
    # One request (110 tokens) fits at a time: the second starts decoding after the first ends.
    assert recs[1].ttft_s >= recs[0].latency_s
    assert recs[2].error_kind == "kv_capacity"


def test_routing_follows_plan_weights():
    fleet = _fleet(n_prefill=2, n_decode=1, weights=[3.0, 1.0])
    recs = simulate(fleet, [_req(i, i * 1.0) for i in range(40)], ConstCosts())
    counts = {r.route: 0 for r in recs}
    for r in recs:
        counts[r.route] += 1
    assert counts == {"p0->d0": 30, "p1->d0": 10}


def test_colocated_group_prefills_inside_decode_steps():
    g = SimGroup("c0", "colocated", (_stage(),))
    fleet = SimFleet("colo", [g], [SimRoute("c0", "c0", 1.0, 0.0)])
    (r,) = simulate(fleet, [_req(0, 0.0)], ConstCosts())
    assert r.ttft_s == pytest.approx(PREFILL_S)  # the prefill step emits the first token
    assert r.latency_s == pytest.approx(PREFILL_S + 9 * STEP_S)


class PipelineCosts(ConstCosts):
    """A two-stage pipeline: a prompt takes 0.2 s through both stages, each stage is busy 0.1 s with it."""

    def prefill_batch_s(self, group, sum_tokens, sum_sq_tokens, own_step=False):
        return 2 * PREFILL_S, PREFILL_S


def test_a_prompt_joining_running_requests_holds_them_for_its_stage_work_not_its_trip():
    g = SimGroup("c0", "colocated", (_stage(),))
    fleet = SimFleet("colo", [g], [SimRoute("c0", "c0", 1.0, 0.0)])
    first, joiner = simulate(fleet, [_req(0, 0.0, out=40), _req(1, 0.25)], PipelineCosts(), SimConfig(keep_itls=True))
    # The joiner's first token takes the prompt's whole trip through the pipeline ...
    assert joiner.ttft_s == pytest.approx(2 * PREFILL_S, abs=STEP_S)
    # ... while the running request's token in that mixed step waits only for a stage's share of it.
    assert max(first.itls_s) == pytest.approx(PREFILL_S + STEP_S)


def test_horizon_stops_the_clock():
    recs = simulate(_fleet(), [_req(0, 0.0), _req(1, 100.0)], ConstCosts(), SimConfig(horizon_s=10.0))
    assert recs[0].success and recs[1].error_kind == "timeout"


def test_result_has_the_harness_schema():
    recs = simulate(_fleet(), [_req(i, i * 0.2) for i in range(20)], ConstCosts())
    res = build_result(recs, SLO(ttft_ms=500, tpot_ms=20), {"source": "simulation"})
    for key in ("completed", "request_throughput", "request_goodput", "slo_attainment", "mean_ttft_ms",
                "p99_tpot_ms", "p90_itl_ms", "ttfts", "timeline"):
        assert key in res
    assert res["completed"] == 20 and res["slo_attainment"] == 1.0


def test_bad_fleets_are_refused():
    with pytest.raises(ValueError, match="is not a prefill group"):
        SimFleet("x", [SimGroup("d0", "decode", (_stage(),))], [SimRoute("d0", "d0", 1.0, 0.0)])
    with pytest.raises(ValueError, match="role"):
        SimGroup("q", "router", (_stage(),))


def test_analytic_costs_on_llama_70b():
    cat, model = default_catalog(), model_preset("Llama-2-70B")
    h100, a6000 = cat.resolve("H100", "g"), cat.resolve("A6000", "g")
    costs = AnalyticCosts(model)
    tp4 = make_group("p", "prefill", model, [(h100, 4, 80)])
    pp2 = make_group("p2", "prefill", model, [(a6000, 4, 40), (a6000, 4, 40)])
    lat_small, _ = costs.prefill_batch_s(tp4, 128, 128**2)
    lat_big, _ = costs.prefill_batch_s(tp4, 4096, 4096**2)
    assert lat_big > 4 * lat_small  # compute-bound at length
    lat, busy = costs.prefill_batch_s(pp2, 2048, 2048**2)
    assert busy < lat  # a pipeline takes the next batch before the first leaves
    assert costs.decode_step_s(tp4, 64, 64 * 1000) > costs.decode_step_s(tp4, 1, 1000)
    with pytest.raises(ValueError, match="lacks"):
        make_group("tiny", "decode", model, [(a6000, 1, 80)])
    assert split_layers(80, [48, 48, 80]) == [22, 22, 36]
    d = make_group("d", "decode", model, [(h100, 4, 80)])
    assert d.kv_capacity_tokens > 100_000
    route = make_route(model, tp4, d, 1.0, bandwidth_gb_per_s=50)
    assert route.kv_seconds_per_token == pytest.approx(model.kv_bytes_per_token / 4 / 50e9)


def test_profile_costs_fit_measured_points():
    prof = ProfileCosts.from_points(
        [{"tokens": s, "latency_s": 0.01 + 1e-4 * s} for s in (16, 64, 256, 512)],
        [{"batch": b, "context_tokens": 100, "step_s": 0.005 + 0.002 * b} for b in (1, 2, 4, 8)])
    g = SimGroup("p", "prefill", (_stage(),))
    assert prof.prefill_batch_s(g, 300, 300**2)[0] == pytest.approx(0.04, rel=0.02)
    assert prof.decode_step_s(g, 3, 300) == pytest.approx(0.011, rel=0.05)


def test_unknown_routing_is_refused():
    with pytest.raises(ValueError, match="routing"):
        SimConfig(routing="random")


def test_load_aware_routing_prefers_the_idle_group():
    stage = _stage()
    groups = [SimGroup("p0", "prefill", (stage,)), SimGroup("d0", "decode", (stage,), max_batch_size=1),
              SimGroup("d1", "decode", (stage,), max_batch_size=64)]
    # d0 is slow (batch 1) but has 3x the weight: weights alone overload it.
    fleet = SimFleet("skew", groups, [SimRoute("p0", "d0", 3.0, 0.0), SimRoute("p0", "d1", 1.0, 0.0)])
    reqs = [_req(i, i * 0.05, out=100) for i in range(80)]
    weighted = simulate(fleet, reqs, ConstCosts(), SimConfig(routing="weighted"))
    aware = simulate(fleet, reqs, ConstCosts(), SimConfig(routing="load_aware", load_scale_tokens=200))
    assert sum(r.route == "p0->d1" for r in aware) > sum(r.route == "p0->d1" for r in weighted) == 20
    assert max(r.latency_s for r in aware) < max(r.latency_s for r in weighted)


def test_the_simulator_picks_routes_as_the_router_does():
    """Weighted routing in the simulator and the router's RoutePolicy at even load make the same picks."""
    fleet = _fleet(n_decode=3, weights=[2.0, 1.0, 1.0])
    records = simulate(fleet, [_req(i, 10.0 * i) for i in range(24)], ConstCosts(), SimConfig(routing="weighted"))
    policy = RoutePolicy([Route(r.prefill, r.decode, r.weight) for r in fleet.routes])
    expected = [policy.choose(lambda w: True, lambda w: 0) for _ in records]
    assert [r.route for r in records] == [f"{e.prefill_worker}->{e.decode_worker}" for e in expected]
    assert [r.route for r in records[:4]].count("p0->d0") == 2
