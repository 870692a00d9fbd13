"""Restarts of running groups in other shapes (planner.core.reshape through the controller): a TP-2 prefill
group split into a prefill and a decode group when the workload turns decode-heavy, two one-GPU groups merged
into a TP-2 prefill group when prompts grow, no flapping, and the simulator's start-before-retire."""

from __future__ import annotations

import pytest

from loadtest.metrics import SLO
from planner.core.observed import ObservedWorkload
from planner.core.replan import ControlPolicy, Controller
from planner.core.solver import solve
from planner.sim.costs import AnalyticCosts
from planner.sim.elastic import simulate_elastic
from planner.spec.cluster import parse_cluster
from planner.spec.model import model_preset
from tests.planner.test_sim_elastic import requests

DECODE_HEAVY = ObservedWorkload(requests=100, rate_rps=20, prompt_mean=600, output_mean=400, prompt_std=300)
LONG_PROMPTS = ObservedWorkload(requests=100, rate_rps=2.5, prompt_mean=6000, output_mean=40, prompt_std=1000)


def three_a100(**workload) -> dict:
    """Node n0 with two A100s, n1 with one; Llama-3-8B."""
    return {"schema": "hexserve.cluster", "schema_version": 1, "name": "three-a100",
            "fleet": {"nodes": [{"name": "n0", "gpu_type": "A100-80G", "num_gpus": 2},
                                {"name": "n1", "gpu_type": "A100-80G", "num_gpus": 1}]},
            "network": {"inter_node": {"bandwidth_gb_per_s": 25, "latency_us": 15}},
            "model": {"preset": "Llama-3-8B"},
            "workload": {**workload, "slo": {"ttft_ms": 1500, "tpot_ms": 100}}}


@pytest.fixture(scope="module")
def long_prompt_plan():
    """Planned for long prompts: n0's two GPUs are one TP-2 prefill group, n1 decodes."""
    cluster = parse_cluster(three_a100(input_tokens_mean=6000, input_tokens_std=1000, output_tokens_mean=40,
                                       arrival_rate_rps=3))
    plan = solve(cluster, mode="disaggregated", time_limit_s=4)
    assert sorted((g.role, len(g.gpus), g.tp) for g in plan.groups) == [("decode", 1, 1), ("prefill", 2, 2)]
    return cluster, plan


@pytest.fixture(scope="module")
def short_prompt_plan():
    """Planned for short prompts and long outputs: three one-GPU groups."""
    cluster = parse_cluster(three_a100(input_tokens_mean=600, input_tokens_std=300, output_tokens_mean=400,
                                       arrival_rate_rps=10))
    plan = solve(cluster, mode="disaggregated", time_limit_s=4)
    assert sorted(len(g.gpus) for g in plan.groups) == [1, 1, 1]
    return cluster, plan


def test_a_decode_heavy_drift_splits_the_tp2_prefill_group(long_prompt_plan):
    cluster, plan = long_prompt_plan
    tp2 = next(g for g in plan.groups if g.tp == 2)
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5))
    decision = controller.step(DECODE_HEAVY, None, 100.0)
    assert decision.action == "apply" and decision.retired == (tp2.id,) and not decision.flips
    assert decision.after_rps >= 1.1 * decision.before_rps
    groups = {g.id: g for g in decision.plan.groups}
    new = [groups[gid] for gid, _, _ in decision.new_groups]
    assert tp2.id not in groups  # its worker retires once the new ones serve
    assert sorted(g.role for g in new) == ["decode", "prefill"]
    assert sorted(gpu for g in new for gpu in g.gpus) == sorted(tp2.gpus) and all(g.tp == 1 for g in new)
    assert all(r.prefill in groups and r.decode in groups for r in decision.plan.routes)
    assert decision.to_json()["retired"] == [tp2.id]
    controller.applied(decision)
    assert set(controller.roles) == set(groups)
    again = controller.step(DECODE_HEAVY, None, 1000.0)  # the same workload: nothing more to change
    assert again.action == "none", again.reason


def test_long_prompts_merge_two_one_gpu_groups_into_a_tp2_prefill_group(short_prompt_plan):
    cluster, plan = short_prompt_plan
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5))
    decision = controller.step(LONG_PROMPTS, None, 100.0)
    assert decision.action == "apply" and len(decision.retired) == 2 and not decision.flips
    on_n0 = sorted(g.id for g in plan.groups if g.gpus[0].startswith("n0:"))
    assert sorted(decision.retired) == on_n0
    (merged,) = [g for g in decision.plan.groups if g.id == decision.new_groups[0][0]]
    assert (merged.role, merged.tp, sorted(merged.gpus)) == ("prefill", 2, ["n0:0", "n0:1"])
    # A flip alone (the best without restarts) serves less of the demand.
    flips_only = Controller(cluster, plan, ControlPolicy(min_requests=5, restarts=False)).step(LONG_PROMPTS, None,
                                                                                               100.0)
    assert flips_only.flips and not flips_only.retired and flips_only.after_rps < decision.after_rps / 1.1


def test_restarts_off_and_dry_run_restart_nothing(long_prompt_plan):
    cluster, plan = long_prompt_plan
    off = Controller(cluster, plan, ControlPolicy(min_requests=5, restarts=False)).step(DECODE_HEAVY, None, 100.0)
    assert not off.retired
    dry = Controller(cluster, plan, ControlPolicy(min_requests=5, dry_run=True))
    decision = dry.step(DECODE_HEAVY, None, 100.0)
    assert decision.action == "dry_run" and decision.retired and dry.plan is plan


def test_a_policy_that_does_not_pay_for_the_restart_keeps_the_plan(long_prompt_plan):
    cluster, plan = long_prompt_plan
    costly = ControlPolicy(min_requests=5, start_cost=0.9)  # each new worker costs 90 % of today's capacity
    decision = Controller(cluster, plan, costly).step(DECODE_HEAVY, None, 100.0)
    assert not decision.retired


def test_the_simulated_split_keeps_the_old_group_serving_until_its_successors_do(long_prompt_plan):
    cluster, plan = long_prompt_plan
    shift = requests([(60, 2.0, 6000, 40), (240, 14.0, 600, 400)])
    costs = AnalyticCosts(model_preset("Llama-3-8B"))
    policy = ControlPolicy(interval_s=10, min_interval_s=30, min_requests=20)
    static = simulate_elastic(cluster, plan, shift, costs, policy=None)
    elastic = simulate_elastic(cluster, plan, shift, costs, policy=policy, startup_s=30.0)
    restarts = [d for d in elastic.actions if d.retired]
    assert restarts, [d.reason for d in elastic.decisions if d.action != "none"][:3]
    assert all(r.success for r in elastic.records), "a restart lost a request"
    slo = SLO(1500.0, 100.0)
    assert sum(slo.met(r) for r in elastic.records) > 1.3 * sum(slo.met(r) for r in static.records)
    # Requests routed through the retired group go on arriving until its successors serve (startup_s).
    first = restarts[0]
    retired = first.retired[0]
    served_after = [r for r in elastic.records if r.start_s > first.at_s and retired in (r.route or "").split("->")]
    assert served_after, "the retired group stopped taking work before its successors served"
    assert max(r.start_s for r in served_after) <= first.at_s + 30.0 + 1.0


def test_the_controller_waits_for_new_groups_to_serve_then_counts_them_lost(long_prompt_plan):
    cluster, plan = long_prompt_plan
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5, min_interval_s=0, start_timeout_s=120))
    decision = controller.step(DECODE_HEAVY, None, 100.0)
    controller.applied(decision)
    new = {gid for gid, _, _ in decision.new_groups}
    kept = set(controller.roles) - new
    loading = controller.step(DECODE_HEAVY, kept, 150.0)  # no second change while the first one's workers load
    assert loading.action == "none" and "waiting for new groups" in loading.reason
    late = controller.step(DECODE_HEAVY, kept, 230.0)  # past start_timeout_s: planned around as unhealthy
    assert late.action == "apply" and set(late.left_out) == new
