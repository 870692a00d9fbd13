"""GET /plan and POST /plan: route weights changed live among the running workers; anything
else (malformed, or needing workers started) refused naming the field, the running plan untouched."""

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

    @property
    def worker_id(self):
        return self.info.worker_id


@pytest.fixture
def served(tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.tiny_model import TINY_MODEL_NAME
    from router.app import create_app
    from router.cluster import Cluster
    from router.deployment import deployment_from_plan
    from router.prepare import RouterSettings

    deployment = deployment_from_plan(local_plan(2, 1), model=tiny_model_dir)
    cluster = Cluster(workers=deployment.workers, routes=deployment.routes, routing="plan")
    cluster.clients = {w.worker_id: _Worker(w) for w in deployment.workers}
    app = create_app(cluster, RouterSettings(TINY_MODEL_NAME, 1024, api_key="k"),
                     AutoTokenizer.from_pretrained(tiny_model_dir), plan_source="plan.json")
    return cluster, caller(app)


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
    assert view["workers"]["prefill-p1"] == {"role": "prefill", "healthy": True, "group": "p1"}
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
