"""`python -m planner control` against a real router: it reads the live workload, decides, and flips.

A three-worker cluster (one prefill, two decode CPU workers of the tiny model,
planned by `planner solve` for short prompts and long answers, 64 and 256 tokens) serves
prompt-heavy traffic (long prompts, 4 output tokens). The controller, run
once with a dry run and then for real, finds that a decode worker should
prefill: the dry run only shows the router's diff; the real run flips the
worker through `POST /plan`, and every request before and after completes.
Then the prefill worker is killed: the next look re-plans around it at once
(its group kept, with no route) and requests go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.tiny_model import TINY_MODEL_NAME
from planner.core.solver import solve
from planner.spec.cluster import parse_cluster
from router_process import start_router

pytestmark = pytest.mark.slow

CLUSTER = {
    "schema": "hexserve.cluster", "schema_version": 1, "name": "three-cpu",
    "fleet": {"nodes": [{"name": f"cpu{i}", "gpu_type": "CPU", "num_gpus": 1} for i in range(3)]},
    "network": {"inter_node": {"bandwidth_gb_per_s": 1.3, "latency_us": 50}},
    "model": {"preset": "hexserve-tiny-llama"}, "options": {"activation_reserve_gib": 0.25},
    "workload": {"input_tokens_mean": 64, "output_tokens_mean": 256, "slo": {"ttft_ms": 2000, "tpot_ms": 200}},
}
# The CPU catalog entry credits a worker with far more than this machine's shared two cores serve:
# asking for 20x the observed rate as headroom makes the few requests a test sends matter.
CONTROL = ["--min-requests", "10", "--headroom", "20", "--once", "--verbose"]


@pytest.fixture(scope="module")
def planned_router(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("control")
    cluster_path = folder / "cluster.json"
    cluster_path.write_text(json.dumps(CLUSTER))
    plan = solve(parse_cluster(CLUSTER), mode="disaggregated", time_limit_s=2)
    assert sorted(g.role for g in plan.groups) == ["decode", "decode", "prefill"]
    plan_path = folder / "plan.json"
    plan.write(plan_path)
    router = start_router(folder, "--plan", str(plan_path), "--model", tiny_model_dir, "--served-model-name",
                          TINY_MODEL_NAME, "--flexible-roles", "--routing", "round-robin")
    yield router, cluster_path, plan_path
    router.stop()


def _send(router, count: int) -> list[int]:
    """`count` prompt-heavy completions (about 600 prompt tokens, 4 output tokens), 3 at a time: status codes."""
    def one(i: int) -> int:
        prompt = " ".join(f"w{(i * 7 + k) % 97}" for k in range(200))
        body = {"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        return httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(one, range(count)))


def _control(router, cluster_path, plan_path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "planner", "control", "--router", router.base_url,
                           "--cluster", str(cluster_path), "--plan", str(plan_path), *CONTROL, *extra],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout
    return lines[0]


def _roles(router) -> dict[str, str]:
    return {w["group"]: w["role"] for w in httpx.get(f"{router.base_url}/plan").json()["workers"].values()}


def _kill_and_wait_unhealthy(router, role: str) -> str:
    """Kill the worker started as `role`; its group once the router reports it unhealthy."""
    os.kill(router.worker_pid(role), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        down = [w["group"] for w in httpx.get(f"{router.base_url}/plan").json()["workers"].values()
                if not w["healthy"]]
        if down:
            return down[0]
        time.sleep(0.2)
    pytest.fail("the router did not see the killed worker go down within 15 s")


def test_the_controller_flips_a_decode_worker_for_prompt_heavy_traffic(planned_router):
    router, cluster_path, plan_path = planned_router
    assert set(_send(router, 16)) == {200}
    roles = _roles(router)

    dry = _control(router, cluster_path, plan_path, "--dry-run")
    assert dry["action"] == "dry_run" and len(dry["flips"]) == 1, dry
    group, old, new = dry["flips"][0]
    assert (old, new) == ("decode", "prefill")
    assert any(change.startswith("flip ") and f"(group {group})" in change for change in dry["router_changes"])
    assert _roles(router) == roles  # a dry run changes nothing
    assert not any(h["action"] == "apply" for h in httpx.get(f"{router.base_url}/plan").json()["history"])

    applied = _control(router, cluster_path, plan_path)
    assert applied["action"] == "apply" and applied["flips"] == dry["flips"], applied
    assert _roles(router) == {**roles, group: "prefill"}
    flips = [line for line in httpx.get(f"{router.base_url}/metrics").text.splitlines()
             if line.startswith("hexserve_role_flips_total")]
    assert flips == ["hexserve_role_flips_total 1.0"], flips
    assert set(_send(router, 6)) == {200}

    # The prefill worker dies: the next look re-plans on the healthy groups at once (no interval wait),
    # starting from the roles the router runs (this is a new controller process).
    lost = _kill_and_wait_unhealthy(router, "prefill")
    replanned = _control(router, cluster_path, plan_path)
    assert replanned["action"] == "apply" and replanned["left_out"] == [lost], replanned
    view = httpx.get(f"{router.base_url}/plan").json()
    lost_worker = next(w for w, info in view["workers"].items() if info["group"] == lost)
    assert view["routes"] and all(lost_worker not in (r["prefill"], r["decode"]) for r in view["routes"])
    assert set(_send(router, 3)) == {200}


def test_a_gpu_listed_later_becomes_a_new_group_when_the_demand_needs_it(planned_router):
    """A fourth device joins the cluster file; the controller starts a group on it through `POST /plan`,
    the router starts its worker, and requests go on (after the test above: a flipped worker, and a
    prefill worker that was killed and is restarted in the background)."""
    router, cluster_path, plan_path = planned_router
    joined = json.loads(json.dumps(CLUSTER))
    joined["fleet"]["nodes"].append({"name": "cpu3", "gpu_type": "CPU", "num_gpus": 1})
    cluster_path.write_text(json.dumps(joined))
    assert set(_send(router, 12)) == {200}
    decision = _control(router, cluster_path, plan_path, "--max-flips", "0")
    assert decision["action"] == "apply" and len(decision["new_groups"]) == 1, decision
    group, role, gpus = decision["new_groups"][0]
    assert gpus == 1 and any(f"(group {group})" in change for change in decision["router_changes"])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        workers = httpx.get(f"{router.base_url}/plan").json()["workers"]
        started = [w for w in workers.values() if w["group"] == group]
        if started and started[0]["healthy"]:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the new group {group}'s worker was not healthy within 180 s: {workers}")
    assert started[0]["role"] == role
    assert set(_send(router, 6)) == {200}
