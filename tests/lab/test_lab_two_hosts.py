"""A two-host lab, for real: prefill on one emulated host, decode on the other.

Two network namespaces joined by a bridge, one link shaped with tbf, one Ray
node in each (with `gpu_type:<T>` resources), the planner's plan for the
lab's cluster file, and `python -m router serve --plan --ray` in the head
host. The workers are Ray actors on their hosts' nodes, each in its device
cgroup; completions must equal a colocated engine's tokens, the KV must
have crossed the veths (interface counters), and `down` must leave nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from common.cpu_cgroup import cgroup_pids, read_quota
from common.ports import free_tcp_port
from lab.launcher import LabPaths, down, up
from lab.network import exec_in, interface_bytes, namespace_pids
from lab.spec import parse_lab
from tests.lab.lab_helpers import assert_nothing_left, lab_unavailable, stop_router

pytestmark = pytest.mark.slow

# 128-token blocks x 4 layers x (K, V) x 2 KV heads x 64 dims x 4 bytes (float32): the tiny model's KV per block.
KV_BYTES_PER_BLOCK = 128 * 4 * 2 * 2 * 64 * 4
LAB = {"schema": "hexserve.lab", "name": "hxci", "subnet": "10.213.11.0/24",
       "device_types": {"FAST": {"cpu_cores": 0.7, "kv_cache_tokens": 8192, "price_per_hour": 1.0},
                        "SLOW": {"cpu_cores": 0.5, "kv_cache_tokens": 4096, "price_per_hour": 0.3}},
       "hosts": [{"name": "h0", "gpu_type": "FAST", "link_mbit_per_s": 2000},
                 {"name": "h1", "gpu_type": "SLOW", "link_mbit_per_s": 300}]}


@pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or "")
def test_two_host_lab_serves_across_hosts_and_cleans_up(tmp_path, reference_llm):
    from vllm import SamplingParams

    lab = parse_lab(LAB)
    down(lab.name)  # a previous run killed half-way
    state = up(lab, cluster_out=tmp_path / "cluster.json")
    router = None
    try:
        plan_path = tmp_path / "plan.json"
        subprocess.run([sys.executable, "-m", "planner", "solve", state["cluster_file"], "--out", str(plan_path),
                        "--mode", "disaggregated", "--quiet"], check=True, timeout=120)
        plan = json.loads(plan_path.read_text())
        host_of = {g["role"]: g["nodes"] for g in plan["groups"]}
        assert sorted(host_of) == ["decode", "prefill"] and host_of["prefill"] != host_of["decode"], host_of
        prefill_host, decode_host = lab.host(host_of["prefill"][0]), lab.host(host_of["decode"][0])
        namespace = {h["name"]: h["namespace"] for h in state["hosts"]}

        port = free_tcp_port()
        router = subprocess.Popen(
            exec_in(namespace[lab.head.name], [sys.executable, "-m", "router", "serve", "--plan", str(plan_path),
                                               "--ray", state["ray_address"], "--port", str(port)]),
            stdout=open(tmp_path / "router.log", "ab"), stderr=subprocess.STDOUT)
        prompts = [list(range(3, 40)), [7, 11, 13] * 50, list(range(100, 300))]
        before = {h: interface_bytes(namespace[h]) for h in namespace}
        out = subprocess.run(
            exec_in(namespace[lab.head.name], [sys.executable, str(Path(__file__).with_name("ns_client.py")),
                                               f"http://127.0.0.1:{port}", json.dumps(prompts)]),
            capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:] + (tmp_path / "router.log").read_text()[-3000:]
        after = {h: interface_bytes(namespace[h]) for h in namespace}

        outputs = json.loads(out.stdout)
        for prompt, tokens in zip(prompts, outputs):
            expected = reference_llm.generate([{"prompt_token_ids": prompt}],
                                              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
            assert tokens == list(expected[0].outputs[0].token_ids)

        # The KV of every prompt block left the prefill host and reached the decode host over the veths.
        kv_bytes = sum(-(-len(p) // 128) for p in prompts) * KV_BYTES_PER_BLOCK
        sent = after[prefill_host.name]["tx_bytes"] - before[prefill_host.name]["tx_bytes"]
        received = after[decode_host.name]["rx_bytes"] - before[decode_host.name]["rx_bytes"]
        assert sent >= kv_bytes and received >= kv_bytes, (sent, received, kv_bytes)

        # Each worker runs in its host's namespace, in a cgroup of its own; the process that
        # runs its model (and only that one) in the child cgroup of its device's CPU quota.
        paths = LabPaths(lab.name)
        for host in (prefill_host, decode_host):
            (worker_cgroup,) = [p for p in paths.host_cgroup(host).iterdir() if p.is_dir()]
            assert read_quota(paths.host_cgroup(host)) is None and read_quota(worker_cgroup) is None
            assert read_quota(worker_cgroup / "device").cpu_cores == pytest.approx(lab.device(host).cpu_cores)
            pids = cgroup_pids(worker_cgroup)
            assert pids and set(pids) <= set(namespace_pids(namespace[host.name]))
            in_device = [psutil.Process(pid).name() for pid in cgroup_pids(worker_cgroup / "device")]
            assert in_device and all(name.startswith("VLLM::Worker") for name in in_device), in_device
        lab_pids = [pid for ns in namespace.values() for pid in namespace_pids(ns)]
    finally:
        stop_router(router)
        removed = down(lab.name)
    assert_nothing_left(lab.name, removed, lab_pids)

