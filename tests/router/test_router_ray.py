"""A plan with two prefill and two decode groups, placed by Ray on a local cluster.

Custom resources stand in for GPU types (`gpu_type:H100`, `gpu_type:A6000`);
the router places each group as an actor in a placement group asking for its
GPU types, and spreads requests by the plan's route flows (3:1 here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.tiny_model import TINY_MODEL_NAME
from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from router_process import start_router

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RAY = str(Path(sys.executable).with_name("ray"))


def _group(group_id: str, role: str, gpu_type: str) -> GroupPlan:
    gpu = f"node-{gpu_type.lower()}:{group_id[-1]}"
    return GroupPlan(id=group_id, role=role, gpus=[gpu], gpu_types={gpu_type: 1}, nodes=[f"node-{gpu_type.lower()}"],
                     region="local", tp=1, pp=1, layer_partition=[4],
                     stages=[StagePlan(node=f"node-{gpu_type.lower()}", gpu_type=gpu_type, gpus=[gpu], tp=1, layers=[0, 4])],
                     capacity_rps=1.0, load_rps=1.0, batch=8, latency_ms=10.0, service_ms=10.0, kv_budget_ms=5.0)


def _plan() -> Plan:
    return Plan(
        mode="disaggregated", cluster="ray-test", model={"name": TINY_MODEL_NAME}, workload={},
        groups=[_group("p0", "prefill", "H100"), _group("p1", "prefill", "A6000"),
                _group("d0", "decode", "H100"), _group("d1", "decode", "A6000")],
        routes=[RoutePlan(prefill="p0", decode="d0", weight=1.0, rate_rps=3.0, kv_gb_per_s=1.0, transfer_ms=1.0),
                RoutePlan(prefill="p1", decode="d1", weight=1.0, rate_rps=1.0, kv_gb_per_s=1.0, transfer_ms=1.0)],
        unused_gpus=[], predicted=Predicted(4.0, 100.0, 50.0, 10.0, 1.0, 1.0, 4.0, None))


@pytest.fixture(scope="module")
def ray_cluster():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "8",
                    "--resources", '{"gpu_type:H100": 2, "gpu_type:A6000": 2}', "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
    yield
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def ray_router(ray_cluster, tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("ray-router")
    _plan().write(folder / "plan.json")
    # The plan policy: this module checks that requests follow the plan's flows exactly.
    router = start_router(folder, "--plan", str(folder / "plan.json"), "--ray", "auto", "--routing", "plan")
    yield router
    router.stop()


def test_groups_run_as_ray_actors_on_their_gpu_types(ray_router):
    import ray

    ray.init(address="auto", log_to_driver=False, ignore_reinit_error=True)
    try:
        names = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
        assert {"hexserve-prefill-p0", "hexserve-prefill-p1", "hexserve-decode-d0", "hexserve-decode-d1"} <= names
        available = ray.available_resources()
        # Each group's placement group holds one unit of its GPU type: 2 of 2 in use.
        assert available.get("gpu_type:H100", 0) == 0 and available.get("gpu_type:A6000", 0) == 0
    finally:
        ray.shutdown()


def test_requests_spread_by_plan_weights(ray_router):
    for i in range(16):
        body = {"model": TINY_MODEL_NAME, "prompt": f"spread {i}", "max_tokens": 4, "temperature": 0}
        response = httpx.post(f"{ray_router.base_url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
    metrics = httpx.get(f"{ray_router.base_url}/metrics").text
    picks = {(m[0], m[1]): float(m[2]) for m in re.findall(
        r'hexserve_route_requests_total\{decode="([^"]+)",prefill="([^"]+)"\} ([\d.]+)', metrics)}
    # Sequential requests leave no load to correct for: the 3:1 flows give exactly 12 and 4.
    assert picks == {("decode-d0", "prefill-p0"): 12.0, ("decode-d1", "prefill-p1"): 4.0}, picks
    loaded = re.findall(r'hexserve_kv_transfer\{stat="transfers_loaded_ok",worker="(decode-d\d)"\} ([\d.e+]+)', metrics)
    assert {w for w, v in loaded if float(v) >= 1} == {"decode-d0", "decode-d1"}


def test_a_worker_that_exits_while_loading_is_seen_dead_at_once_and_never_blocks(ray_cluster, tmp_path):
    """Its model is missing, so the worker process exits while loading while its actor lives
    on. The launcher's alive check (what the router's start waits on, from its event loop)
    turns False within seconds of the exit and answers every call at once: before, the
    router's start kept waiting out its whole timeout for such a worker."""
    import time

    from common.roles import Role
    from engine.worker_spec import WorkerSpec
    from router.deployment import Deployment
    from router.launch_local import local_endpoint
    from router.launch_ray import RayLauncher

    spec = WorkerSpec(worker_id="gone", role=Role.DECODE, control_endpoint=local_endpoint(),
                      model=str(tmp_path / "no-such-model"))
    launcher = RayLauncher("auto", Deployment(workers=[spec], routes=[], model_path=spec.model,
                                              served_model_name="gone", max_model_len=1024, placement={}))
    try:
        launcher.start(spec)
        check = launcher.alive_checks()["gone"]
        deadline, slowest_s = time.monotonic() + 180, 0.0
        while True:
            asked_at = time.monotonic()
            alive = check()
            slowest_s = max(slowest_s, time.monotonic() - asked_at)
            if not alive:
                break
            assert time.monotonic() < deadline, "the worker's exit was not seen in 180 s"
            time.sleep(0.2)
        assert slowest_s < 0.5, slowest_s
        assert launcher.is_alive("gone") is False  # the blocking check agrees
    finally:
        launcher.stop()
