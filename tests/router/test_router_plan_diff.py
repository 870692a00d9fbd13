"""What a plan asks of the running workers (router.plan_diff), without engines: which groups
start, retire, restart (TP/PP, a role a flip cannot take) or flip, the new workers' names and
specs (built as at start, placement included), and the route changes."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.local_plans import local_plan
from common.plan import Plan
from common.roles import Role
from common.routing import Route
from router.deployment import deployment_from_plan, group_worker
from router.launch_ray import placement_bundles
from router.openai_schema import ApiError
from router.plan_diff import diff_plan


def _running(plan: Plan, flexible: bool = False, rehearsal: bool = False):
    """The workers, routes and settings of a router started on `plan` (a model named: not a rehearsal)."""
    deployment = deployment_from_plan(plan, model=None if rehearsal else "/models/tiny", worker_link="tcp",
                                      flexible_roles=flexible)
    return deployment.workers, deployment.routes, deployment.settings


def _replaced_d0() -> Plan:
    """1 prefill + 2 decode, decode groups d1 and d2: d0 of the 1p1d plan is not in it."""
    plan = local_plan(1, 3)
    plan.groups = [g for g in plan.groups if g.id != "d0"]
    plan.routes = [r for r in plan.routes if r.decode != "d0"]
    return plan


def test_new_groups_start_and_a_group_left_out_retires():
    workers, routes, settings = _running(local_plan(1, 1))
    diff = diff_plan(_replaced_d0(), workers, routes, settings)
    assert [s.worker_id for s in diff.starts] == ["decode-d1", "decode-d2"] and diff.retires == ["decode-d0"]
    assert diff.roles == {"prefill-p0": Role.PREFILL} and diff.needs_workers
    assert diff.routes == [Route("prefill-p0", "decode-d1", 1.0), Route("prefill-p0", "decode-d2", 1.0)]
    assert diff.changes == ["start decode-d1 (group d1): decode, tp=1, pp=1", "start decode-d2 (group d2): decode, tp=1, pp=1",
                            "retire decode-d0 (group d0): not in the plan",
                            "+ prefill-p0->decode-d1 weight 1", "+ prefill-p0->decode-d2 weight 1",
                            "- prefill-p0->decode-d0"]
    # Built as at start: the same spec as a router started on the new plan would run.
    at_start = {w.worker_id: w for w in _running(_replaced_d0())[0]}
    for spec in diff.starts:
        assert dataclasses.replace(spec, control_endpoint="", kv_endpoint="", kv_events_endpoint="") == \
            dataclasses.replace(at_start[spec.worker_id], control_endpoint="", kv_endpoint="", kv_events_endpoint="")
    assert diff.placement["decode-d1"] == {"nodes": ["cpu"], "gpu_types": {"CPU": 1}, "num_gpus": 1}


def test_the_same_plan_changes_nothing_and_weights_alone_need_no_worker():
    workers, routes, settings = _running(local_plan(2, 1))
    assert diff_plan(local_plan(2, 1), workers, routes, settings).changes == []
    reweighted = local_plan(2, 1)
    reweighted.routes[0].rate_rps = 3.0
    diff = diff_plan(reweighted, workers, routes, settings)
    assert not diff.needs_workers and diff.changes == ["~ prefill-p0->decode-d0 weight 1 -> 3"]


def test_a_tp_or_pp_change_restarts_the_group_under_its_next_revision():
    workers, routes, settings = _running(local_plan(1, 1))
    plan = local_plan(1, 1)
    plan.groups[1].tp = 2
    diff = diff_plan(plan, workers, routes, settings)
    assert [s.worker_id for s in diff.starts] == ["decode-d0-r1"] and diff.retires == ["decode-d0"]
    new = diff.starts[0]
    assert new.tensor_parallel_size == 2 and new.group_id == "d0" and new.kv_endpoint != workers[1].kv_endpoint
    assert diff.changes[0] == "restart decode-d0 (group d0) as decode-d0-r1: tp=1, pp=1 -> tp=2, pp=1"
    assert diff.routes == [Route("prefill-p0", "decode-d0-r1", 1.0)]
    # The next reshape of the same group: revision 2; a pipeline split is a shape too.
    plan.groups[1].pp, plan.groups[1].layer_partition = 2, [3, 1]
    again = diff_plan(plan, [workers[0], new], diff.routes, settings)
    assert [s.worker_id for s in again.starts] == ["decode-d0-r2"] and again.retires == ["decode-d0-r1"]
    assert again.starts[0].layer_partition == (3, 1)
    plan.groups[1].layer_partition = [2, 2]
    assert diff_plan(plan, [workers[0], again.starts[0]], again.routes, settings).changes[0] == (
        "restart decode-d0-r2 (group d0) as decode-d0-r3: tp=2, pp=2, layers [3, 1] -> tp=2, pp=2, layers [2, 2]")


def test_a_rehearsal_runs_every_group_with_tp_1_so_a_tp_change_restarts_nothing():
    running, plan = local_plan(1, 1), local_plan(1, 1)
    running.model = plan.model = {"name": "Llama-2-70B"}  # another model's plan, the tiny one standing in
    workers, routes, settings = _running(running, rehearsal=True)
    plan.groups[1].tp = 4
    assert not diff_plan(plan, workers, routes, settings).needs_workers


def test_a_role_change_a_flip_cannot_do_restarts_the_worker_in_its_new_role():
    workers, routes, settings = _running(local_plan(2, 1))  # not flexible
    plan = local_plan(2, 1)
    plan.groups[1].role = "decode"  # p1 becomes a decode worker: its route p1->d0 goes
    plan.routes = [plan.routes[0], dataclasses.replace(plan.routes[0], decode="p1")]
    diff = diff_plan(plan, workers, routes, settings)
    assert [(s.worker_id, s.role) for s in diff.starts] == [("decode-p1-r1", Role.DECODE)]
    assert diff.retires == ["prefill-p1"]
    assert diff.changes[0] == ("restart prefill-p1 (group p1) as decode-p1-r1: prefill -> decode needs a restart: "
                               "it was started without a kv_both connector; start the router with --flexible-roles "
                               "to flip prefill and decode workers without a restart")
    flexible = _running(local_plan(2, 1), flexible=True)
    assert diff_plan(plan, *flexible).changes[0] == "flip prefill-p1 (group p1): prefill -> decode"
    plan.groups[1].role = "colocated"  # never a flip
    plan.routes = [plan.routes[0]]
    colocated = diff_plan(plan, *flexible)
    assert [(s.worker_id, s.role, s.kv_endpoint) for s in colocated.starts] == [("colocated-p1-r1", Role.COLOCATED, None)]
    assert Route("colocated-p1-r1", "colocated-p1-r1", 1.0) in colocated.routes


def test_a_new_worker_never_takes_a_running_workers_name():
    workers, routes, settings = _running(local_plan(1, 1))
    plan = local_plan(1, 1)
    plan.groups[1].tp = 2
    first = diff_plan(plan, workers, routes, settings).starts[0]  # decode-d0-r1
    extra = dataclasses.replace(plan.groups[1], id="d0-r1", tp=1)  # a group whose plain name is taken
    plan.groups.append(extra)
    plan.routes.append(dataclasses.replace(plan.routes[0], decode="d0-r1"))
    running = [*workers, dataclasses.replace(first, group_id="other")]
    names = [s.worker_id for s in diff_plan(plan, running, routes, settings).starts]
    assert len(set(names)) == len(names) and "decode-d0-r1" not in names, names


@pytest.mark.parametrize("mutate, param, says", [
    (lambda p: setattr(p, "routes", []), "routes", "the plan has no route with positive flow"),
    (lambda p: setattr(p.routes[0], "decode", "d9"), "routes[0].decode", "group 'd9' is not in the plan's groups"),
    (lambda p: p.groups.append(p.groups[1]), "groups[2]", "group id 'd0' appears twice"),
    (lambda p: setattr(p.groups[0], "role", "prefil"), "groups[0].role", "is not a role"),
])
def test_what_no_change_can_serve_is_refused_naming_the_field(mutate, param, says):
    workers, routes, settings = _running(local_plan(1, 1))
    plan = local_plan(1, 1)
    mutate(plan)
    with pytest.raises(ApiError) as refused:
        diff_plan(plan, workers, routes, settings)
    assert refused.value.status_code == 400 and refused.value.param == param and says in refused.value.message


def test_a_new_groups_ray_placement_asks_for_its_gpu_types_on_its_node():
    """On Ray a started group is placed as at start: a bundle per GPU type, on its node if the cluster names it."""
    plan = local_plan(1, 1)
    group = dataclasses.replace(plan.groups[1], id="d1", gpus=["n1:0", "n1:1"], gpu_types={"H100": 2}, nodes=["n1"])
    workers, routes, settings = _running(plan)
    plan.groups.append(group)
    plan.routes.append(dataclasses.replace(plan.routes[0], decode="d1"))
    diff = diff_plan(plan, workers, routes, settings)
    assert diff.placement == {"decode-d1": {"nodes": ["n1"], "gpu_types": {"H100": 2}, "num_gpus": 2}}
    assert group_worker(group, settings, "decode-d1")[1] == diff.placement["decode-d1"]
    bundles, strategy = placement_bundles(diff.placement["decode-d1"], use_gpus=True, named_nodes=frozenset({"n1"}))
    assert strategy == "STRICT_PACK" and bundles[0]["gpu_type:H100"] == 2.0 and bundles[0]["GPU"] == 2.0
    assert [k for k in bundles[0] if k.startswith("hexserve_node")], bundles
