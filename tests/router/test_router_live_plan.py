"""GET /plan and POST /plan: route weights and the roles of flexible workers changed live among
the running workers; anything else refused naming the field, the running plan untouched: a
malformed plan, and, by a router without a launcher (these apps have none), a plan that needs
workers started or restarted (a new group, a TP change, a flip of a worker that is not
flexible). With a launcher those start and retire workers: tests/router/test_router_plan_changes.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from asgi_client import caller

from benchmarks.local_plans import local_plan


@dataclass
class _Worker:
    info: object
    healthy: bool = True
    outstanding_tokens: int = 0
    load: object = None

    @property
    def worker_id(self):
        return self.info.worker_id


def _serve(model_dir: str, plan, flexible_roles: bool = False):
    from transformers import AutoTokenizer

    from engine.tiny_model import TINY_MODEL_NAME
    from router.app import create_app
    from router.cluster import Cluster
    from router.deployment import deployment_from_plan
    from router.prepare import RouterSettings

    deployment = deployment_from_plan(plan, model=model_dir, flexible_roles=flexible_roles)
    cluster = Cluster(workers=deployment.workers, routes=deployment.routes, routing="plan")
    cluster.clients = {w.worker_id: _Worker(w) for w in deployment.workers}
    app = create_app(cluster, RouterSettings(TINY_MODEL_NAME, 1024, api_key="k"),
                     AutoTokenizer.from_pretrained(model_dir), plan_source="plan.json")
    return cluster, caller(app)


@pytest.fixture
def served(tiny_model_dir):
    """Two prefill workers and one decode worker, started without --flexible-roles."""
    return _serve(tiny_model_dir, local_plan(2, 1))


@pytest.fixture
def flexible(tiny_model_dir):
    """One prefill and two decode workers, started with --flexible-roles."""
    return _serve(tiny_model_dir, local_plan(1, 2), flexible_roles=True)


def _reweighted(p0_rate: float) -> dict:
    plan = local_plan(2, 1)
    plan.routes[0].rate_rps = p0_rate
    return plan.to_json()


def test_get_plan_shows_routes_workers_and_history(served):
    _cluster, call = served
    assert call("GET", "/plan", key=None).status_code == 401
    view = call("GET", "/plan").json()
    assert view["routing"] == "plan"
    assert {(r["prefill"], r["decode"], r["weight"]) for r in view["routes"]} == {
        ("prefill-p0", "decode-d0", 1.0), ("prefill-p1", "decode-d0", 1.0)}
    assert view["workers"]["prefill-p1"] == {"role": "prefill", "healthy": True, "group": "p1", "flexible": False}
    assert [h["action"] for h in view["history"]] == ["start"] and view["history"][0]["source"] == "plan.json"
    assert view["observed"]["requests"] == 0 and view["observed"]["window_s"] == 60.0


def test_post_plan_changes_the_weights_live(served):
    cluster, call = served
    answer = call("POST", "/plan", _reweighted(3.0))
    assert answer.status_code == 200, answer.text
    assert answer.json()["changes"] == ["~ prefill-p0->decode-d0 weight 1 -> 3"]
    picks = Counter(cluster.choose_route([1, 2, 3]).route.prefill_worker for _ in range(40))
    assert picks == {"prefill-p0": 30, "prefill-p1": 10}
    assert [h["action"] for h in call("GET", "/plan").json()["history"]] == ["start", "apply"]


def test_dry_run_changes_nothing(served):
    cluster, call = served
    before = list(cluster.routes)
    answer = call("POST", "/plan?dry_run=true", _reweighted(5.0))
    assert answer.status_code == 200 and answer.json()["action"] == "dry_run"
    assert answer.json()["changes"] == ["~ prefill-p0->decode-d0 weight 1 -> 5"]
    assert cluster.routes == before and len(call("GET", "/plan").json()["history"]) == 1


def _without(doc: dict, path: tuple) -> dict:
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


@pytest.mark.parametrize("mutate, param", [
    (lambda d: _without(d, ("groups", 0, "role")), "groups[0].role"),
    (lambda d: {**d, "routes": "p0->d0"}, "routes"),
    (lambda d: {**d, "schema_version": 99}, "schema_version"),
    (lambda d: {**d, "groups": d["groups"] + [{**d["groups"][0], "id": "p9"}]}, "groups[3]"),
    (lambda d: {**d, "routes": d["routes"] + [{**d["routes"][0], "decode": "d7"}]}, "routes[2].decode"),
    (lambda d: [d], None),
    (lambda d: {**d, "weights": {"p0": 3}}, "weights"),
])
def test_a_malformed_or_unservable_plan_is_refused_and_the_running_plan_untouched(served, mutate, param):
    cluster, call = served
    before = list(cluster.routes)
    answer = call("POST", "/plan", mutate(local_plan(2, 1).to_json()))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.json()
    assert cluster.routes == before and len(call("GET", "/plan").json()["history"]) == 1


def _flipped(**mutations) -> dict:
    """The 1p2d plan with group d1 flipped to prefill, its routes now p0->d0 and d1->d0."""
    plan = local_plan(1, 2)
    plan.groups[2].role = "prefill"
    plan.routes[1].prefill, plan.routes[1].decode = "d1", "d0"
    doc = plan.to_json()
    for index, fields in mutations.items():
        doc["groups"][int(index.removeprefix("g"))].update(fields)
    return doc


FLIP_CHANGES = ["flip decode-d1 (group d1): decode -> prefill", "+ decode-d1->decode-d0 weight 1",
                "- prefill-p0->decode-d1"]


def test_post_plan_flips_a_flexible_worker_with_its_routes(flexible):
    cluster, call = flexible
    assert call("GET", "/plan").json()["workers"]["decode-d1"]["flexible"] is True
    answer = call("POST", "/plan", _flipped())
    assert answer.status_code == 200, answer.text
    assert answer.json()["changes"] == FLIP_CHANGES
    view = call("GET", "/plan").json()
    assert view["workers"]["decode-d1"] == {"role": "prefill", "healthy": True, "group": "d1", "flexible": True}
    assert [h["action"] for h in view["history"]] == ["start", "apply"] and view["history"][1]["changes"] == FLIP_CHANGES
    assert cluster.clients["decode-d1"].info.role == "prefill" and cluster.role_flips == 1
    picks = Counter((r.prefill_worker, r.decode_worker) for r in (cluster.choose_route([1, 2]).route for _ in range(4)))
    assert picks == {("prefill-p0", "decode-d0"): 2, ("decode-d1", "decode-d0"): 2}
    assert "hexserve_role_flips_total 1.0" in call("GET", "/metrics").text
    back = local_plan(1, 2).to_json()  # and back: decode again, routes as at start
    assert call("POST", "/plan", back).json()["changes"][0] == "flip decode-d1 (group d1): prefill -> decode"
    assert cluster.role_flips == 2


def test_a_dry_run_flip_reports_it_and_changes_nothing(flexible):
    cluster, call = flexible
    before = list(cluster.routes)
    answer = call("POST", "/plan?dry_run=true", _flipped())
    assert answer.status_code == 200 and answer.json()["action"] == "dry_run"
    assert answer.json()["changes"] == FLIP_CHANGES
    assert cluster.routes == before and cluster.clients["decode-d1"].info.role == "decode" and cluster.role_flips == 0
    assert len(call("GET", "/plan").json()["history"]) == 1


@pytest.mark.parametrize("doc, param, says", [
    (_flipped(g2={"role": "colocated"}), "groups[2]", "only prefill and decode workers flip"),
    (_flipped(g2={"id": "d7"}), "groups[2]", "is not a running worker"),
    (_flipped(g2={"role": "decoder"}), "groups[2].role", "is not a role"),
    (local_plan(1, 2).to_json() | {"groups": _flipped()["groups"]}, "routes",
     "route prefill-p0->decode-d1 runs from a prefill worker to a prefill worker"),
])
def test_a_flip_the_running_workers_cannot_take_is_refused_naming_the_group(flexible, doc, param, says):
    cluster, call = flexible
    before = list(cluster.routes)
    answer = call("POST", "/plan", doc)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert says in answer.json()["error"]["message"]
    assert cluster.routes == before and cluster.clients["decode-d1"].info.role == "decode" and cluster.role_flips == 0
    assert len(call("GET", "/plan").json()["history"]) == 1


def test_a_flip_of_a_worker_started_without_flexible_roles_is_refused_without_a_launcher(served):
    cluster, call = served
    doc = local_plan(2, 1).to_json()
    doc["groups"][1]["role"] = "decode"
    answer = call("POST", "/plan", doc)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "groups[1]"
    assert answer.json()["error"]["message"] == (
        "groups[1]: group 'p1' asks worker prefill-p1 to flip from prefill to decode, but it was started without a "
        "kv_both connector; start the router with --flexible-roles to flip prefill and decode workers without a "
        "restart")
    assert cluster.clients["prefill-p1"].info.role == "prefill" and cluster.role_flips == 0


def test_a_flip_with_a_tp_change_needs_a_restart_and_is_refused_without_a_launcher(tiny_model_dir):
    plan = local_plan(1, 2)
    plan.groups[2].tp = 2  # decode-d1 runs with TP 2 (not a rehearsal: a model is named)
    cluster, call = _serve(tiny_model_dir, plan, flexible_roles=True)
    answer = call("POST", "/plan", _flipped(g2={"tp": 4}))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "groups[2]"
    assert "group 'd1' (prefill, tp=4, pp=1) is not a running worker" in answer.json()["error"]["message"]
    assert call("POST", "/plan", _flipped(g2={"tp": 2})).status_code == 200  # the same TP: flipped
    assert cluster.clients["decode-d1"].info.role == "prefill"
