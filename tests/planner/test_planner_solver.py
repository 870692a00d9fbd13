"""The heuristic end to end: roles, refinement, modes, determinism, infeasible fleets, baselines."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import planner_baselines as baselines
from common.roles import Role
from planner.core.flow import RouteTable
from planner.core.refine import COLOCATED, DISAGGREGATED, Move, Search, State
from planner.core.solver import Planner, solve
from planner.core.strategy import GroupEvaluator
from planner.spec.errors import InfeasibleFleetError, PlanInputError
from planner_factories import make_cluster

REPO = Path(__file__).resolve().parents[2]

TWO_TYPE = [{"gpu_type": "H100", "num_gpus": 8, "count": 2}, {"gpu_type": "L40S", "num_gpus": 8, "count": 2}]


def search_for(cluster, mode=DISAGGREGATED):
    return Search(GroupEvaluator(cluster), RouteTable(cluster), mode)


def test_role_assignment_balances_capacities():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 2}])
    s = search_for(c)
    state = s.assign_roles([((0, 4),), ((0, 4),), ((1, 4),), ((1, 4),)])
    value, _ = s.evaluate(state)
    # Every split of four equal groups: the best is what assign_roles found.
    cp, cd = s.cap(((0, 4),), Role.PREFILL), s.cap(((0, 4),), Role.DECODE)
    assert value == pytest.approx(max(min(k * cp, (4 - k) * cd) for k in range(5)))


def test_move_apply_keeps_gpus_and_roles_consistent():
    state = State([((0, 4),), ((0, 4),)], [Role.PREFILL, Role.DECODE], {1: 2})
    new = Move("merge", (0, 1), ((((0, 8),), Role.PREFILL),), ((1, -2),)).apply(state)
    assert new.groups == [((0, 8),)] and new.roles == [Role.PREFILL] and new.pool == {}
    assert state.groups == [((0, 4),), ((0, 4),)]  # the original is untouched


def test_refinement_never_lowers_throughput_and_fixes_a_bad_start():
    c = make_cluster(nodes=TWO_TYPE)
    s = search_for(c)
    bad = State([((0, 8),), ((1, 8),), ((2, 8),), ((3, 8),)], [Role.PREFILL, Role.PREFILL, Role.PREFILL, Role.DECODE], {})
    start, _ = s.evaluate(bad)
    refined, value = s.refine(bad)
    assert value >= start
    assert value > 1.5 * start
    assert value == pytest.approx(s.evaluate(refined)[0])


def test_refinement_grows_from_the_pool():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8}])
    s = search_for(c)
    state = State([((0, 2),), ((0, 2),)], [Role.PREFILL, Role.DECODE], {0: 4})
    _, start_flow = s.evaluate(state)
    refined, value = s.refine(state)
    assert sum(k for g in refined.groups for _, k in g) + sum(refined.pool.values()) == 8
    assert value > s.evaluate(state)[0]
    assert start_flow is not None


def test_solve_is_deterministic_for_a_seed():
    c = make_cluster(nodes=TWO_TYPE)
    a = solve(c, seed=3, time_limit_s=20).to_json()
    b = solve(c, seed=3, time_limit_s=20).to_json()
    for doc in (a, b):
        doc["solver"].pop("solve_time_s")
    assert a == b


def test_plan_is_consistent():
    c = make_cluster(nodes=TWO_TYPE)
    plan = solve(c, mode=DISAGGREGATED, time_limit_s=20)
    gpus = [g for grp in plan.groups for g in grp.gpus] + plan.unused_gpus
    assert len(gpus) == len(set(gpus)) == c.num_gpus
    for g in plan.groups:
        assert sum(g.layer_partition) == c.model.num_layers
        assert [s.layers for s in g.stages] == [[sum(g.layer_partition[:i]), sum(g.layer_partition[:i + 1])]
                                                 for i in range(g.pp)]
        assert sorted(x for s in g.stages for x in s.gpus) == sorted(g.gpus)
        assert g.load_rps <= g.capacity_rps * (1 + 1e-6)
    by_id = {g.id: g for g in plan.groups}
    for pid in {r.prefill for r in plan.routes}:
        assert sum(r.weight for r in plan.routes if r.prefill == pid) == pytest.approx(1.0)
        assert by_id[pid].role == Role.PREFILL
    assert all(by_id[r.decode].role == Role.DECODE for r in plan.routes)
    assert sum(r.rate_rps for r in plan.routes) == pytest.approx(plan.predicted.load_rps, rel=1e-6)
    p = plan.predicted
    assert p.cost_per_hour == pytest.approx(c.price_per_hour)
    assert p.tokens_per_dollar == pytest.approx(p.throughput_rps * 256 * 3600 / p.cost_per_hour)
    assert p.tpot_ms <= 100 + 1e-6 and p.ttft_ms <= 2000 + 1e-6


def test_auto_mode_picks_the_better_of_the_two():
    c = make_cluster(nodes=TWO_TYPE)
    auto = solve(c, mode="auto", time_limit_s=20)
    alts = auto.solver["alternatives"]
    assert auto.throughput_rps == pytest.approx(max(alts.values()))
    colocated = solve(c, mode=COLOCATED, time_limit_s=10)
    assert all(g.role == Role.COLOCATED for g in colocated.groups) and not colocated.routes
    assert colocated.throughput_rps == pytest.approx(alts[COLOCATED], rel=1e-6)


def test_a_prefill_heavy_workload_gets_more_prefill_gpus():
    def prefill_share(workload):
        plan = solve(make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 4}], workload=workload),
                     mode=DISAGGREGATED, time_limit_s=20)
        return sum(len(g.gpus) for g in plan.groups if g.role == Role.PREFILL) / 32

    long_prompts = {"input_tokens_mean": 4096, "output_tokens_mean": 64, "slo": {"ttft_ms": 4000, "tpot_ms": 100}}
    long_outputs = {"input_tokens_mean": 256, "output_tokens_mean": 1024, "slo": {"ttft_ms": 4000, "tpot_ms": 100}}
    assert prefill_share(long_prompts) > prefill_share(long_outputs)


def test_cross_region_plan_keeps_most_kv_traffic_inside_regions():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 2, "region": "us"},
                            {"gpu_type": "A100-80G", "num_gpus": 8, "count": 2, "region": "eu"}])
    plan = solve(c, mode=DISAGGREGATED, time_limit_s=20)
    region = {g.id: g.region for g in plan.groups}
    local = sum(r.rate_rps for r in plan.routes if region[r.prefill] == region[r.decode])
    assert local >= 0.9 * sum(r.rate_rps for r in plan.routes)
    assert {g.region for g in plan.groups if g.role == Role.PREFILL} == {"us", "eu"}


def test_time_limit_is_honoured():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 8}, {"gpu_type": "L40S", "num_gpus": 8, "count": 8}])
    plan = solve(c, time_limit_s=1.0)
    assert plan.solver["solve_time_s"] < 8.0  # the limit, plus one move's evaluation on a busy machine
    assert plan.throughput_rps > 0


def test_infeasible_fleet_reports_the_shortfall():
    c = make_cluster(nodes=[{"gpu_type": "T4", "num_gpus": 4}])
    with pytest.raises(InfeasibleFleetError) as info:
        solve(c)
    # 4 x T4 hold ~52 GiB usable; Llama-2-70B needs ~128 GiB of weights.
    assert 70 < info.value.shortfall_gib < 90
    assert "GiB short" in str(info.value) and info.value.field == "fleet"


def test_disaggregation_needs_two_replicas_and_says_so():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 2}])
    with pytest.raises(InfeasibleFleetError, match="only one") as info:
        solve(c, mode=DISAGGREGATED)
    assert info.value.shortfall_gib > 100
    assert solve(c, mode="auto").mode == COLOCATED


def test_bad_mode_and_time_limit_name_the_field():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8}])
    with pytest.raises(PlanInputError, match="mode: 'fast' is not a mode"):
        solve(c, mode="fast")
    with pytest.raises(PlanInputError, match="time_limit_s"):
        solve(c, time_limit_s=0)


def test_planner_is_never_below_a_baseline():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 2}, {"gpu_type": "A100-80G", "num_gpus": 8},
                            {"gpu_type": "L40S", "num_gpus": 8, "count": 2}])
    plan = solve(c, mode=DISAGGREGATED, time_limit_s=20)
    ev, routes = GroupEvaluator(c), RouteTable(c)
    for result in (baselines.per_type_split(c, ev, routes), baselines.distserve_uniform(c, ev, routes),
                   baselines.random_partition(c, 3, ev, routes)):
        assert result.throughput_rps > 0, result.name
        assert plan.throughput_rps >= result.throughput_rps * (1 - 1e-9), result.name
    homog = baselines.homogeneous_best(c, c.price_per_hour, time_limit_s=5)
    assert homog.cost_per_hour <= c.price_per_hour + 1e-9
    assert plan.throughput_rps >= homog.throughput_rps


def test_planner_check_feasible_accepts_a_fleet_that_fits():
    Planner(make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 2}])).check_feasible()


def test_the_search_ends_at_least_where_every_per_type_split_refines_to():
    """A per-type role split's first value says little about where its refinement ends: on the fleet
    benchmark's mixed fleet (with the roofline cost model) the best two started 6th and 9th of 14, and the
    search that refined only the best-scoring one settled 14 % lower. On the budget example's offer (five types,
    planned whole) the best still does not start first."""
    import json
    import time

    from planner.spec.cluster import parse_cluster

    with open(REPO / "configs" / "budget_llama3_8b.json", encoding="utf-8") as fh:
        doc = json.load(fh)
    del doc["workload"]["price_budget_per_hour"]  # plan the whole offer, as a fleet
    cluster = parse_cluster(doc, base_dir=str(REPO / "configs"))
    planner = Planner(cluster)
    search = Search(planner.evaluator, planner.routes, DISAGGREGATED, deadline=time.monotonic() + 120)
    splits = planner.per_type_states(search)
    assert len(splits) > 10
    best_split = max(search.refine(state)[1] for _, state in splits)
    assert best_split > search.refine(splits[0][1])[1]  # the best-scoring start is not where the best ends
    plan = solve(cluster, mode=DISAGGREGATED, time_limit_s=60)
    assert plan.predicted.throughput_rps >= best_split * (1 - 1e-9)
