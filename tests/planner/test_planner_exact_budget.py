"""OR-Tools: the exact optimum certifies the heuristic on small fleets; budget mode picks GPUs to rent."""

from __future__ import annotations

import pytest

from common.roles import Role
from planner.core.budget import choose_gpus
from planner.core.exact import compositions, solve_exact
from planner.core.flow import RouteTable
from planner.core.refine import COLOCATED, DISAGGREGATED, Search
from planner.core.solver import solve, solve_exact_plan
from planner.core.strategy import GroupEvaluator
from planner.spec.errors import PlanInputError
from planner_factories import make_cluster

SMALL_FLEETS = {
    "two-type-8": [{"gpu_type": "H100", "num_gpus": 4}, {"gpu_type": "A100-80G", "num_gpus": 4}],
    "two-type-16": [{"gpu_type": "H100", "num_gpus": 8}, {"gpu_type": "L40S", "num_gpus": 8}],
    "cross-region-12": [{"gpu_type": "H100", "num_gpus": 4, "region": "us"},
                        {"gpu_type": "A100-80G", "num_gpus": 8, "region": "eu"}],
}


@pytest.mark.parametrize("name", sorted(SMALL_FLEETS))
def test_heuristic_is_within_two_percent_of_the_exact_optimum(name):
    c = make_cluster(nodes=SMALL_FLEETS[name])
    exact = solve_exact(c, time_limit_s=120)
    assert exact.optimal
    heuristic = solve(c, mode=DISAGGREGATED, time_limit_s=20)
    assert heuristic.throughput_rps >= 0.98 * exact.value_rps
    assert heuristic.throughput_rps <= exact.bound_rps * (1 + 1e-6)  # nothing beats a proven optimum


def test_exact_solution_uses_each_gpu_at_most_once_and_its_value_is_a_real_flow():
    c = make_cluster(nodes=SMALL_FLEETS["two-type-16"])
    ev, routes = GroupEvaluator(c), RouteTable(c)
    result = solve_exact(c, evaluator=ev, routes=routes)
    used: dict[int, int] = {}
    for g in result.state.groups:
        for n, k in g:
            used[n] = used.get(n, 0) + k
    assert all(used[n] <= c.nodes[n].num_gpus for n in used)
    assert result.value_rps == pytest.approx(Search(ev, routes, DISAGGREGATED).evaluate(result.state)[0])
    assert result.value_rps == pytest.approx(result.bound_rps, rel=1e-3)


def test_exact_colocated_mode_and_plan():
    c = make_cluster(nodes=SMALL_FLEETS["two-type-8"])
    plan = solve_exact_plan(c, COLOCATED, time_limit_s=60)
    assert plan.solver["optimal"] and all(g.role == Role.COLOCATED for g in plan.groups)
    assert plan.throughput_rps >= solve(c, mode=COLOCATED, time_limit_s=10).throughput_rps * (1 - 1e-6)


def test_exact_refuses_large_fleets():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 3}])
    with pytest.raises(PlanInputError, match="at most 16 GPUs"):
        compositions(c)


BUDGET_FLEET = [{"gpu_type": "H100", "num_gpus": 8, "count": 2}, {"gpu_type": "L40S", "num_gpus": 8, "count": 2},
                {"gpu_type": "A10G", "num_gpus": 4, "count": 4}]


def test_budget_choice_stays_within_budget_and_availability():
    c = make_cluster(nodes=BUDGET_FLEET, model="Llama-3-8B")
    choice = choose_gpus(c, 20.0)
    assert choice.cost_per_hour <= 20.0 + 1e-9
    assert choice.counts and all(k > 0 for k in choice.counts.values())
    assert choice.counts.get("H100", 0) <= 16 and choice.counts.get("A10G", 0) <= 16
    assert sum(choice.node_counts.values()) == sum(choice.counts.values())
    for n, k in choice.node_counts.items():
        assert k <= c.nodes[n].num_gpus
    bigger = choose_gpus(c, 40.0)
    assert bigger.estimated_rps > choice.estimated_rps


def test_budget_mode_plans_the_rented_subset():
    c = make_cluster(nodes=BUDGET_FLEET, model="Llama-3-8B")
    plan = solve(c, time_limit_s=10, budget_per_hour=20.0)
    assert plan.predicted.cost_per_hour <= 20.0 + 1e-9
    assert plan.solver["budget"]["rented"]
    assert sum(len(g.gpus) for g in plan.groups) + len(plan.unused_gpus) == sum(plan.solver["budget"]["rented"].values())
    # The chosen mix beats spending the same budget on the single best-looking type alone.
    h100_only = solve(make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 6}], model="Llama-3-8B"), time_limit_s=10)
    assert plan.throughput_rps >= h100_only.throughput_rps


def test_budget_too_small_says_what_is_needed():
    c = make_cluster(nodes=BUDGET_FLEET)
    with pytest.raises(PlanInputError, match="at least \\$"):
        choose_gpus(c, 1.0)
