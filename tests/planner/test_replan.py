"""The re-planning controller (planner.core.replan): when it acts, what it proposes, and its guardrails."""

from __future__ import annotations

import pytest

from common.roles import Role
from planner.core.observed import ObservedWorkload, drift
from planner.core.replan import ControlPolicy, Controller
from planner.core.solver import solve
from planner.spec.cluster import parse_cluster
from planner.spec.errors import PlanInputError

CONVERSATION = dict(input_tokens_mean=1155, input_tokens_std=1000, output_tokens_mean=120, arrival_rate_rps=10)


def four_a100(**workload) -> dict:
    return {"schema": "hexserve.cluster", "schema_version": 1, "name": "four-a100",
            "fleet": {"nodes": [{"name": f"n{i}", "gpu_type": "A100-80G", "num_gpus": 1} for i in range(4)]},
            "network": {"inter_node": {"bandwidth_gb_per_s": 25, "latency_us": 15}},
            "model": {"preset": "Llama-3-8B"},
            "workload": {**CONVERSATION, **workload, "slo": {"ttft_ms": 2000, "tpot_ms": 100}}}


@pytest.fixture(scope="module")
def solved():
    cluster = parse_cluster(four_a100())
    return cluster, solve(cluster, mode="disaggregated", time_limit_s=4)


def decode_heavy(rate: float = 30.0, output: float = 400.0) -> ObservedWorkload:
    return ObservedWorkload(requests=100, rate_rps=rate, prompt_mean=600, output_mean=output, prompt_std=300)


def test_the_solved_plan_has_prefill_groups_to_flip(solved):
    _, plan = solved
    assert sorted(g.role for g in plan.groups) == ["decode", "prefill", "prefill"]


def test_a_workload_like_the_plans_changes_nothing(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5))
    same = ObservedWorkload(100, 10.0, 1155, 120, 1000)
    assert drift(same, cluster.workload) < 1e-9
    decision = controller.step(same, None, 100.0)
    assert decision.action == "none" and "drift" in decision.reason and decision.plan is None


def test_too_few_requests_are_not_trusted(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=50))
    decision = controller.step(ObservedWorkload(10, 30.0, 600, 400, 300), None, 100.0)
    assert decision.action == "none" and "fewer than 50" in decision.reason


def test_a_decode_heavy_drift_flips_a_prefill_group_keeping_ids_gpus_and_shape(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5))
    decision = controller.step(decode_heavy(), None, 100.0)
    assert decision.action == "apply", decision.reason
    assert len(decision.flips) == 1 and decision.flips[0][1:] == ("prefill", "decode")
    assert decision.after_rps >= decision.before_rps * 1.1
    before = {g.id: g for g in plan.groups}
    after = {g.id: g for g in decision.plan.groups}
    assert set(after) == set(before)  # the same groups: the running workers
    for gid, g in after.items():
        assert g.gpus == before[gid].gpus and (g.tp, g.pp) == (before[gid].tp, before[gid].pp)
        assert g.layer_partition == before[gid].layer_partition and g.stages == before[gid].stages
        expected = "decode" if gid == decision.flips[0][0] else before[gid].role
        assert g.role == expected
    assert all(r.prefill in after and r.decode in after for r in decision.plan.routes)
    assert {after[r.prefill].role for r in decision.plan.routes} == {"prefill"}
    controller.applied(decision)
    assert controller.roles[decision.flips[0][0]] is Role.DECODE and controller.flips_total == 1


def test_the_flip_cap_and_the_minimum_interval(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5, max_flips=1, min_interval_s=60,
                                                         restarts=False))
    first = controller.step(decode_heavy(rate=60, output=800), None, 100.0)
    assert first.action == "apply" and len(first.flips) == 1
    controller.applied(first)
    soon = controller.step(decode_heavy(rate=60, output=800), None, 130.0)
    assert soon.action == "none" and "within 60 s" in soon.reason


def test_a_dry_run_decides_and_changes_nothing(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5, dry_run=True))
    roles = dict(controller.roles)
    decision = controller.step(decode_heavy(), None, 100.0)
    assert decision.action == "dry_run" and decision.flips and decision.plan is not None
    with pytest.raises(ValueError):
        controller.applied(decision)
    assert controller.roles == roles and controller.plan is plan


def test_a_lost_worker_is_planned_around_at_once(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5, min_interval_s=1e9))
    lost = next(g.id for g in plan.groups if g.role == "prefill")
    healthy = {g.id for g in plan.groups} - {lost}
    controller._last_action_s = 99.0  # an action just now: a lost worker does not wait for the interval
    decision = controller.step(None, healthy, 100.0)
    assert decision.action == "apply" and decision.left_out == (lost,)
    # It keeps its group (a plan without it would retire its worker), with no route and no load.
    kept = next(g for g in decision.plan.groups if g.id == lost)
    assert kept.load_rps == 0.0 and kept.gpus == next(g for g in plan.groups if g.id == lost).gpus
    assert all(lost not in (r.prefill, r.decode) for r in decision.plan.routes)
    assert not set(kept.gpus) & set(decision.plan.unused_gpus)
    controller.applied(decision)
    back = controller.step(None, healthy | {lost}, 100.5)
    assert back.action == "apply" and lost in {g.id for g in back.plan.groups}


def _crossover_output(cluster, plan) -> float:
    """The output length at which flipping a prefill group to decode starts to pay, found by bisection."""
    eager = ControlPolicy(min_requests=5, min_gain=0.0, flip_cost=0.0, min_interval_s=0.0, drift_threshold=0.0,
                          restarts=False)
    lo, hi = 100.0, 2000.0
    for _ in range(30):
        mid = (lo + hi) / 2
        flips = Controller(cluster, plan, eager).step(ObservedWorkload(100, 60.0, 1155, mid, 1000), None, 0.0).flips
        lo, hi = (lo, mid) if flips else (mid, hi)
    return hi


def test_hysteresis_stops_flapping_on_a_workload_at_the_threshold(solved):
    cluster, plan = solved
    x = _crossover_output(cluster, plan)
    wobble = [ObservedWorkload(100, 60.0, 1155, x * (1.01 if k % 2 else 0.99), 1000) for k in range(12)]

    def flips(policy: ControlPolicy) -> int:
        controller = Controller(cluster, plan, policy)
        for k, observed in enumerate(wobble):
            decision = controller.step(observed, None, 100.0 * (k + 1))
            if decision.action == "apply":
                controller.applied(decision)
        return controller.flips_total

    # Without a margin, every wobble flips the group back and forth: the test can fail.
    assert flips(ControlPolicy(min_requests=5, min_gain=0.0, flip_cost=0.0, min_interval_s=0.0,
                               drift_threshold=0.0, restarts=False)) >= 6
    assert flips(ControlPolicy(min_requests=5, restarts=False)) == 0


def test_a_plan_the_controller_cannot_run_is_refused_with_the_field(solved):
    cluster, plan = solved
    other = parse_cluster({**four_a100(), "fleet": {"nodes": [{"name": "m0", "gpu_type": "A100-80G",
                                                               "num_gpus": 4}]}})
    with pytest.raises(PlanInputError, match=r"groups\[0\]\.gpus"):
        Controller(other, plan)
    colocated = solve(cluster, mode="colocated", time_limit_s=2)
    with pytest.raises(PlanInputError, match="mode"):
        Controller(cluster, colocated)


def test_observed_workload_from_the_routers_window():
    summary = {"requests": 40, "requests_per_s": 2.0, "prompt_tokens_mean": 500.0, "prompt_tokens_std": 100.0,
               "output_tokens_mean": 50.0}
    observed = ObservedWorkload.from_summary(summary)
    assert observed == ObservedWorkload(40, 2.0, 500.0, 50.0, 100.0)
    assert ObservedWorkload.from_summary({"requests": 0, "prompt_tokens_mean": None}) is None
    base = parse_cluster(four_a100()).workload
    workload = observed.as_workload(base)
    assert workload.input_mean == 500 and workload.input_sq_mean == 500**2 + 100**2
    assert workload.ttft_slo_s == base.ttft_slo_s and workload.arrival_rate_rps == 2.0
    assert workload.input_tail > 500  # a log-normal tail from the std


def test_the_running_roles_are_adopted_before_deciding(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5))
    flipped = next(g.id for g in plan.groups if g.role == "prefill")
    assert controller.adopt_roles({flipped: "decode", "unknown": "prefill"}) == [f"{flipped}: prefill -> decode"]
    assert controller.roles[flipped] is Role.DECODE
    assert next(g.role for g in controller.plan.groups if g.id == flipped) == "decode"
    assert controller.adopt_roles({flipped: "decode"}) == []  # nothing differs any more


def test_measured_latencies_slower_than_predicted_shrink_that_roles_capacity():
    from common.plan import Predicted
    from planner.core.running import MIN_SCALE, measured_scale

    predicted = Predicted(10.0, 100.0, ttft_ms=200.0, tpot_ms=20.0, cost_per_hour=1.0, tokens_per_dollar=1.0,
                          load_rps=5.0, meets_arrival_rate=True)
    slow = ObservedWorkload(50, 5.0, 500, 50, ttft_ms_p50=800.0, tpot_ms_p50=25.0)
    assert measured_scale(predicted, slow).to_json() == {"prefill": 0.25, "decode": 0.8}
    fast = ObservedWorkload(50, 5.0, 500, 50, ttft_ms_p50=50.0, tpot_ms_p50=5.0)
    assert measured_scale(predicted, fast).worst == 1.0  # faster than modelled adds nothing
    assert measured_scale(predicted, ObservedWorkload(50, 5.0, 500, 50, tpot_ms_p50=1e6)).decode == MIN_SCALE
    assert measured_scale(predicted, ObservedWorkload(50, 5.0, 500, 50)).worst == 1.0  # not measured


def test_a_plan_slower_than_modelled_is_replanned_without_any_drift(solved):
    cluster, plan = solved
    same = dict(requests=100, rate_rps=10.0, prompt_mean=1155, output_mean=120, prompt_std=1000)
    as_modelled = Controller(cluster, plan, ControlPolicy(min_requests=5)).step(
        ObservedWorkload(**same, ttft_ms_p50=1.0, tpot_ms_p50=1.0), None, 100.0)
    assert as_modelled.action == "none" and "within 50% of predicted" in as_modelled.reason
    slow_decode = Controller(cluster, plan, ControlPolicy(min_requests=5)).step(
        ObservedWorkload(**same, ttft_ms_p50=1.0, tpot_ms_p50=1000.0), None, 100.0)
    assert slow_decode.action == "apply", slow_decode.reason
    assert slow_decode.scale.decode < 0.5 and slow_decode.scale.prefill == 1.0
    assert [f[1:] for f in slow_decode.flips] == [("prefill", "decode")]
    assert "scaled by the measured latencies" in slow_decode.reason


def _joined(extra: int) -> dict:
    """four_a100 with `extra` more single-A100 nodes listed (GPUs that joined the fleet)."""
    doc = four_a100()
    doc["fleet"]["nodes"] += [{"name": f"n{4 + i}", "gpu_type": "A100-80G", "num_gpus": 1} for i in range(extra)]
    return doc


def test_gpus_that_join_become_new_groups_when_the_demand_needs_them(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5, max_flips=0, max_new_groups=2))
    assert controller.update_fleet(parse_cluster(_joined(2))) is True
    demand = ObservedWorkload(100, 40.0, 1155, 120, 1000)  # 4x the rate the plan was made for
    decision = controller.step(demand, None, 100.0)
    assert decision.action == "apply", decision.reason
    assert len(decision.new_groups) == 2 and "new group" in decision.reason
    assert decision.after_rps > decision.before_rps * 1.1
    running = {g.id: g for g in plan.groups}
    after = {g.id: g for g in decision.plan.groups}
    assert set(running) < set(after)  # the running groups stay, with their GPUs and shapes
    for gid, g in running.items():
        assert after[gid].gpus == g.gpus and (after[gid].tp, after[gid].pp) == (g.tp, g.pp)
    started = {gid: after[gid] for gid, _, _ in decision.new_groups}
    assert sorted(gpu for g in started.values() for gpu in g.gpus) == ["n4:0", "n5:0"]
    assert all(g.role == role for (gid, role, _), g in zip(decision.new_groups, started.values()))
    assert decision.plan.unused_gpus == []
    assert any(r.prefill in started or r.decode in started for r in decision.plan.routes)
    controller.applied(decision)
    assert set(controller.roles) == set(after)
    # Once applied, the same demand asks for nothing more: no GPU is idle.
    assert controller.step(demand, None, 200.0).new_groups == ()


def test_idle_gpus_are_left_alone_while_the_plan_serves_its_demand(solved):
    cluster, plan = solved
    controller = Controller(cluster, plan, ControlPolicy(min_requests=5))
    controller.update_fleet(parse_cluster(_joined(2)))
    decision = controller.step(ObservedWorkload(100, 10.0, 1155, 120, 1000), None, 100.0)
    assert decision.action == "none" and decision.new_groups == () and "not needed" in decision.reason
    later = controller.step(ObservedWorkload(100, 10.0, 1155, 120, 1000), None, 200.0)
    assert later.action == "none" and "drift" in later.reason  # looked at once, then back to the drift gate


def test_a_dry_run_or_max_new_groups_0_starts_nothing_and_a_node_that_left_is_refused(solved):
    cluster, plan = solved
    dry = Controller(cluster, plan, ControlPolicy(min_requests=5, max_flips=0, dry_run=True))
    dry.update_fleet(parse_cluster(_joined(2)))
    decision = dry.step(ObservedWorkload(100, 40.0, 1155, 120, 1000), None, 100.0)
    assert decision.action == "dry_run" and decision.new_groups and set(dry.roles) == {g.id for g in plan.groups}
    never = Controller(cluster, plan, ControlPolicy(min_requests=5, max_flips=0, max_new_groups=0))
    never.update_fleet(parse_cluster(_joined(2)))
    assert never.step(ObservedWorkload(100, 40.0, 1155, 120, 1000), None, 100.0).new_groups == ()
    smaller = four_a100()
    used = {gpu.rpartition(":")[0] for g in plan.groups for gpu in g.gpus}
    smaller["fleet"]["nodes"] = [n for n in smaller["fleet"]["nodes"] if n["name"] not in used][:1] + \
        [n for n in smaller["fleet"]["nodes"] if n["name"] in used][1:]
    with pytest.raises(PlanInputError, match=r"fleet\.nodes.*of running group"):
        never.update_fleet(parse_cluster(smaller))
    other_model = _joined(1)
    other_model["model"] = {"preset": "Llama-2-7B"}
    with pytest.raises(PlanInputError, match=r"^model: .*re-plan"):
        never.update_fleet(parse_cluster(other_model))
    assert never.cluster.num_gpus == 6  # a refused file leaves the fleet as it was
