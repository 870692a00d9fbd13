"""A group that spans hosts, for real: one decode engine with a pipeline stage on each of two hosts.

vLLM's multiprocessing executor runs the engine over both hosts (host 0 the
engine behind the router, host 1 its headless ranks); the prefill worker
sends each decode rank its layers on that rank's own host, so half of every
prompt's KV crosses the veth to the second host. Completions must equal a
colocated engine's tokens, each host's ranks must run in that host's device
cgroup, and `down` must leave nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.cpu_cgroup import cgroup_pids
from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from common.ports import free_tcp_port
from lab.launcher import LabPaths, down, up
from lab.network import exec_in, interface_bytes, namespace_pids
from lab.spec import parse_lab
from tests.lab.lab_helpers import assert_nothing_left, lab_unavailable, stop_router

pytestmark = pytest.mark.slow

# 128-token blocks x 2 layers (one stage's) x (K, V) x 2 KV heads x 64 dims x 4 bytes (float32).
KV_BYTES_PER_STAGE_BLOCK = 128 * 2 * 2 * 2 * 64 * 4
LAB = {"schema": "hexserve.lab", "name": "hxspan", "subnet": "10.213.14.0/24", "max_pipeline_stages": 2,
       "device_types": {"FAST": {"cpu_cores": 0.5, "kv_cache_tokens": 8192, "price_per_hour": 1.0},
                        "SLOW": {"cpu_cores": 0.4, "kv_cache_tokens": 4096, "price_per_hour": 0.3}},
       "hosts": [{"name": "h0", "gpu_type": "FAST", "num_devices": 2, "link_mbit_per_s": 2000},
                 {"name": "h1", "gpu_type": "SLOW", "link_mbit_per_s": 300}]}


def spanning_plan() -> Plan:
    """Prefill on h0's first device; decode with layers 0-1 on h0's second device and 2-3 on h1."""
    def group(group_id, role, stages):
        gpus = [g for stage in stages for g in stage.gpus]
        types: dict[str, int] = {}
        for stage in stages:
            types[stage.gpu_type] = types.get(stage.gpu_type, 0) + len(stage.gpus)
        return GroupPlan(id=group_id, role=role, gpus=gpus, gpu_types=types, nodes=sorted({s.node for s in stages}),
                         region="lab", tp=1, pp=len(stages), layer_partition=[s.layers[1] - s.layers[0] for s in stages],
                         stages=stages, capacity_rps=1.0, load_rps=1.0, batch=8, latency_ms=100.0, service_ms=100.0,
                         kv_budget_ms=0.0)

    prefill = group("g0", "prefill", [StagePlan("h0", "FAST", ["h0:0"], 1, [0, 4])])
    decode = group("g1", "decode", [StagePlan("h0", "FAST", ["h0:1"], 1, [0, 2]),
                                    StagePlan("h1", "SLOW", ["h1:0"], 1, [2, 4])])
    predicted = Predicted(throughput_rps=1.0, output_tokens_per_s=64.0, ttft_ms=500.0, tpot_ms=100.0,
                          cost_per_hour=2.3, tokens_per_dollar=1.0, load_rps=1.0, meets_arrival_rate=True)
    return Plan(mode="disaggregated", cluster="lab-hxspan", model={"name": "hexserve-tiny-llama"}, workload={},
                groups=[prefill, decode], routes=[RoutePlan("g0", "g1", 1.0, 1.0, 0.0, 0.0)], unused_gpus=[],
                predicted=predicted)


@pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")
def test_a_decode_engine_spanning_two_hosts_serves_token_equal(tmp_path, reference_llm):
    from vllm import SamplingParams

    lab = parse_lab(LAB)
    down(lab.name)  # a previous run killed half-way
    state = up(lab, cluster_out=tmp_path / "cluster.json")
    assert json.loads((tmp_path / "cluster.json").read_text())["options"]["max_pipeline_stages"] == 2
    router = None
    try:
        plan_path = tmp_path / "plan.json"
        spanning_plan().write(plan_path)
        namespace = {h["name"]: h["namespace"] for h in state["hosts"]}
        port = free_tcp_port()
        router = subprocess.Popen(
            exec_in(namespace["h0"], [sys.executable, "-m", "router", "serve", "--plan", str(plan_path),
                                      "--ray", state["ray_address"], "--port", str(port)]),
            stdout=open(tmp_path / "router.log", "ab"), stderr=subprocess.STDOUT)
        prompts = [list(range(3, 40)), [7, 11, 13] * 50, list(range(100, 300))]
        before = interface_bytes(namespace["h1"])
        outputs = _complete(namespace["h0"], port, prompts, tmp_path / "router.log")
        after = interface_bytes(namespace["h1"])

        for prompt, tokens in zip(prompts, outputs):
            expected = reference_llm.generate([{"prompt_token_ids": prompt}],
                                              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
            assert tokens == list(expected[0].outputs[0].token_ids)

        # The second stage's layers of every prompt block reached h1 over its veth.
        kv_bytes = sum(-(-len(p) // 128) for p in prompts) * KV_BYTES_PER_STAGE_BLOCK
        assert after["rx_bytes"] - before["rx_bytes"] >= kv_bytes, (after, before, kv_bytes)

        # Each host runs its stage's rank in the decode worker's device cgroup of that host.
        paths = LabPaths(lab.name)
        for host in ("h0", "h1"):
            device = paths.host_cgroup(lab.host(host)) / "decode-g1" / "device"
            ranks = [psutil.Process(pid) for pid in cgroup_pids(device)]
            assert ranks and all(p.name().startswith("VLLM::Worker") for p in ranks), [p.name() for p in ranks]
            assert {p.pid for p in ranks} <= set(namespace_pids(namespace[host]))

        # h1's share dies (its host's processes killed): the router starts the engine again on both
        # hosts (its ranks meet only at start), and serves through it once it is back.
        _kill_and_wait_for_restart(paths.host_cgroup(lab.host("h1")) / "decode-g1")
        before = interface_bytes(namespace["h1"])
        assert _complete(namespace["h0"], port, prompts[2:], tmp_path / "router.log", "--until-ok") == outputs[2:]
        assert "worker decode-g1 had exited; started it again" in (tmp_path / "router.log").read_text()
        received = interface_bytes(namespace["h1"])["rx_bytes"] - before["rx_bytes"]
        assert received >= -(-len(prompts[2]) // 128) * KV_BYTES_PER_STAGE_BLOCK, received
        lab_pids = [pid for ns in namespace.values() for pid in namespace_pids(ns)]
    finally:
        stop_router(router)
        removed = down(lab.name)
    assert_nothing_left(lab.name, removed, lab_pids)


def _complete(namespace: str, port: int, prompts: list[list[int]], router_log: Path, *options: str) -> list:
    """Completions of `prompts` through the router in the head's namespace (tests/lab/ns_client.py)."""
    out = subprocess.run(exec_in(namespace, [sys.executable, str(Path(__file__).with_name("ns_client.py")),
                                             f"http://127.0.0.1:{port}", json.dumps(prompts), *options]),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:] + router_log.read_text()[-3000:]
    return json.loads(out.stdout)


def _kill_and_wait_for_restart(share: Path, timeout_s: float = 60.0) -> None:
    """Kill every process of one host's share of the engine; wait until new ones run there."""
    killed = cgroup_pids(share)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while not set(cgroup_pids(share)) - set(killed) and time.monotonic() < deadline:
        time.sleep(1)
