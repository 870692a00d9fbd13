"""The control loop on the simulator's clock (planner.sim.elastic): same decisions, lost workers, no lost requests."""

from __future__ import annotations

import random

import pytest

from loadtest.metrics import SLO
from loadtest.workload import PlannedRequest
from planner.core.replan import ControlPolicy
from planner.core.solver import solve
from planner.sim.costs import AnalyticCosts
from planner.sim.elastic import simulate_elastic
from planner.spec.cluster import parse_cluster
from planner.spec.model import model_preset
from tests.planner.test_replan import four_a100

SLO_BOTH = SLO(2000.0, 100.0)


@pytest.fixture(scope="module")
def solved():
    cluster = parse_cluster(four_a100())
    return cluster, solve(cluster, mode="disaggregated", time_limit_s=4)


def requests(phases: list[tuple[float, float, int, int]], seed: int = 1) -> list[PlannedRequest]:
    """(seconds, rate, prompt, output) per phase, Poisson arrivals, lengths +-20 %."""
    rng, out, start = random.Random(seed), [], 0.0
    for seconds, rate, prompt, output in phases:
        t = start
        while (t := t + rng.expovariate(rate)) < start + seconds:
            out.append(PlannedRequest(len(out), t, int(prompt * rng.uniform(0.8, 1.2)),
                                      max(1, int(output * rng.uniform(0.8, 1.2)))))
        start += seconds
    return out


def goodput(records) -> int:
    return sum(SLO_BOTH.met(r) for r in records)


def test_elastic_follows_a_decode_heavy_shift_and_loses_no_request(solved):
    cluster, plan = solved
    shift = requests([(60, 8.0, 1155, 120), (120, 22.0, 600, 400)])  # beyond the plan, within it once flipped
    costs = AnalyticCosts(model_preset("Llama-3-8B"))
    policy = ControlPolicy(interval_s=10, min_interval_s=30, min_requests=20)
    static = simulate_elastic(cluster, plan, shift, costs, policy=None)
    elastic = simulate_elastic(cluster, plan, shift, costs, policy=policy)
    assert elastic.actions and all(d.flips for d in elastic.actions)
    assert not static.decisions
    assert all(r.success for r in elastic.records), "an action lost a request"
    assert goodput(elastic.records) > 1.2 * goodput(static.records)
    # The same decisions as the controller alone makes: flips to decode only, within the cap and interval.
    times = [d.at_s for d in elastic.actions]
    assert all(b - a >= policy.min_interval_s for a, b in zip(times, times[1:]))
    assert all(len(d.flips) <= policy.max_flips and d.flips[0][2] == "decode" for d in elastic.actions)


def test_a_lost_worker_fails_what_it_held_and_gets_no_more_work(solved):
    cluster, plan = solved
    lost = next(g.id for g in plan.groups if g.role == "prefill")
    load = requests([(60, 8.0, 1155, 120)])
    costs = AnalyticCosts(model_preset("Llama-3-8B"))
    for policy in (None, ControlPolicy(min_requests=20)):
        run = simulate_elastic(cluster, plan, load, costs, policy=policy, failures=[(30.0, lost)])
        failed = [r for r in run.records if not r.success]
        assert all(r.error_kind == "worker_lost" and r.arrival_s < 30.0 for r in failed)
        later = [r for r in run.records if r.arrival_s > 30.0]
        assert later and all(r.success and lost not in r.route.split("->") for r in later)
    actions = run.actions
    assert actions and actions[0].left_out == (lost,) and actions[0].at_s <= 40.0


def test_an_unknown_failure_group_is_refused(solved):
    cluster, plan = solved
    with pytest.raises(ValueError, match="no such prefill or decode group"):
        simulate_elastic(cluster, plan, requests([(5, 1.0, 100, 10)]), AnalyticCosts(model_preset("Llama-3-8B")),
                         failures=[(1.0, "g99")])


def test_gpus_that_join_under_rising_load_become_groups_after_their_startup(solved):
    from tests.planner.test_replan import _joined

    cluster, plan = solved
    rising = requests([(60, 8.0, 1155, 120), (240, 38.0, 1155, 120)])  # beyond the ~35 req/s the plan serves
    costs = AnalyticCosts(model_preset("Llama-3-8B"))
    policy = ControlPolicy(interval_s=10, min_interval_s=30, min_requests=20, max_flips=0)
    joins = [(30.0, parse_cluster(_joined(2)))]
    static = simulate_elastic(cluster, plan, rising, costs, policy=None, joins=joins)
    elastic = simulate_elastic(cluster, plan, rising, costs, policy=policy, joins=joins, startup_s=60.0)
    grew = [d for d in elastic.actions if d.new_groups]
    assert grew and sum(len(d.new_groups) for d in grew) == 2
    assert all(r.success for r in elastic.records), "starting a group lost a request"
    assert goodput(elastic.records) > 2 * goodput(static.records)
    # Nothing reaches a new group before its worker has loaded.
    started_at = grew[0].at_s
    new_ids = {gid for gid, _, _ in grew[0].new_groups}
    assert all(r.start_s >= started_at + 60.0 for r in elastic.records if getattr(r, "route", None)
               and set(r.route.split("->")) & new_ids)
