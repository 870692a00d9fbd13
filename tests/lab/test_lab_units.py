"""The lab's parts without Ray or engines: the lab file's checks, the cluster file it
writes, device cgroups, refusals, and teardown after a failed start."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import time

import pytest

from common.cpu_cgroup import CpuQuota, cgroup_pids, join_command, make_cgroup, read_quota, remove_cgroup
from common.emulated_device import EmulatedDevices
from common.ray_resources import named_nodes
from engine.config import tiny_model_settings
from engine.worker_spec import WorkerSpec
from lab import launcher
from lab.cluster_file import cluster_document
from lab.launcher import LabError, LabPaths, down, up
from lab.network import lab_namespaces, tbf_args
from lab.spec import parse_lab
from planner.spec.cluster import parse_cluster
from planner.spec.errors import PlanInputError
from router.launch_ray import on_emulated_devices

LAB = {"schema": "hexserve.lab", "name": "hxu", "subnet": "10.213.12.0/24",
       "device_types": {"FAST": {"cpu_cores": 0.6, "kv_cache_tokens": 16384, "price_per_hour": 1.0},
                        "SLOW": {"cpu_cores": 0.2, "kv_cache_tokens": 4096, "price_per_hour": 0.3}},
       "hosts": [{"name": "h0", "gpu_type": "FAST", "link_mbit_per_s": 2000},
                 {"name": "h1", "gpu_type": "SLOW", "num_devices": 2, "link_mbit_per_s": 100}]}


def _with(**changes):
    data = copy.deepcopy(LAB)
    for path, value in changes.items():
        target = data
        *parents, last = path.split("__")
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value
    return data


def test_lab_file_is_read_with_addresses_and_links():
    lab = parse_lab(LAB)
    assert [h.address for h in lab.hosts] == ["10.213.12.1", "10.213.12.2"]
    assert lab.link_mbit_per_s(*lab.hosts) == 100
    assert lab.total_cpu_cores() == pytest.approx(1.0)


@pytest.mark.parametrize("changes, field", [
    ({"name": "Bad-Name"}, "name"),
    ({"name": "waytoolongname"}, "name"),
    ({"subnet": "8.8.8.0/24"}, "subnet"),
    ({"subnet": "10.0.0.0/33"}, "subnet"),
    ({"hosts__1__gpu_type": "H100"}, "hosts[1].gpu_type"),
    ({"hosts__1__name": "h0"}, "hosts[1].name"),
    ({"hosts__0__link": 5}, "hosts[0].link"),
    ({"device_types__FAST__cpu_cores": 0}, "device_types.FAST.cpu_cores"),
    ({"device_types__FAST__cpu_cores": 64}, "device_types"),  # more CPU than the machine has
    ({"profiles": {"MID": "p.json"}}, "profiles.MID"),
    ({"schema": "hexserve.cluster"}, "schema"),
])
def test_bad_lab_file_names_the_field(changes, field):
    with pytest.raises(PlanInputError) as err:
        parse_lab(_with(**changes))
    assert err.value.field == field


def test_cluster_file_plans_the_lab():
    lab = parse_lab(LAB)
    cluster = parse_cluster(cluster_document(lab))
    assert [(n.name, n.gpu_type, n.num_gpus) for n in cluster.nodes] == [("h0", "FAST", 1), ("h1", "SLOW", 2)]
    assert cluster.price_per_hour == pytest.approx(1.6)
    assert cluster.bandwidth[0, 1] == pytest.approx(100e6 / 8)  # the slower link, in bytes/s
    fast, slow = cluster.nodes[0].spec, cluster.nodes[1].spec
    assert fast.flops_per_s == pytest.approx(3 * slow.flops_per_s)
    assert fast.memory_gib > slow.memory_gib
    # A device's engine core schedules between the model's passes: no overlap of host work.
    assert not fast.host_work_overlaps and not slow.host_work_overlaps
    assert cluster.options.max_pipeline_stages == 1


def test_tbf_bucket_holds_frames_and_scales():
    assert tbf_args(100)[:2] == ["rate", "100mbit"]
    assert int(tbf_args(100)[3]) >= 4 * 9000
    assert int(tbf_args(10_000)[3]) == int(10_000e6 / 8 * 0.005)


def test_emulated_devices_give_a_worker_its_devices(tmp_path):
    devices = EmulatedDevices(gpu_type="SLOW", num_devices=2, cpu_cores_per_device=0.25,
                              kv_cache_tokens_per_device=1000, cgroup_parent=str(tmp_path))
    devices.write(tmp_path / "d.json")
    assert EmulatedDevices.read(tmp_path / "d.json") == devices
    assert devices.quota(2).quota_us == 5000 and devices.kv_cache_blocks(2, 128) == 16  # 2000 tokens
    # One unbound OpenMP thread per whole core of CPU time, at least one.
    # The model's process finds its devices' cgroup, a child of the worker's, in its environment.
    assert dict(devices.engine_env(1, "decode-g1")) == {
        "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "HEXSERVE_DEVICE_CGROUP": str(tmp_path / "decode-g1" / "device")}
    assert devices.device_cgroup("decode-g1").parent == devices.worker_cgroup("decode-g1")
    assert dict(dataclasses.replace(devices, cpu_cores_per_device=0.8).engine_env(2, "w"))["OMP_NUM_THREADS"] == "2"
    spec = WorkerSpec(worker_id="decode-g1", role="decode", control_endpoint="tcp://10.0.0.1:5000")
    assert on_emulated_devices(spec, None, 1) is spec  # a real GPU node: unchanged
    with pytest.raises(RuntimeError, match="needs 3 devices"):
        on_emulated_devices(spec, devices, 3)
    assert spec.launch_command() == spec.command()
    limited = WorkerSpec(worker_id="w", role="decode", control_endpoint="tcp://10.0.0.1:5000",
                         cpu_cgroup="/sys/fs/cgroup/cpu/x", kv_cache_blocks=16)
    assert limited.launch_command()[:2] == ["/bin/sh", "-c"] and limited.launch_command()[-len(limited.command()):] == limited.command()
    assert limited.command()[limited.command().index("--kv-cache-blocks") + 1] == "16"
    assert tiny_model_settings(num_kv_cache_blocks=16).engine_kwargs()["num_gpu_blocks_override"] == 16


def test_lab_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        up(parse_lab(LAB))
    result = subprocess.run([sys.executable, "-m", "lab", "down", "hxu"], capture_output=True, text=True,
                            env={**os.environ}, timeout=60)
    assert result.returncode in (0, 2) and "Traceback" not in result.stderr


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
                                reason="namespaces and cgroups need root and the cgroup v1 cpu controller")


@needs_root
def test_a_process_runs_inside_its_cgroup_and_is_killed_with_it():
    path = make_cgroup(LabPaths("hxu").cgroup / "probe", CpuQuota(0.3))
    try:
        assert read_quota(path).cpu_cores == pytest.approx(0.3)
        proc = subprocess.Popen(join_command(["sleep", "60"], path))
        time.sleep(0.3)
        assert cgroup_pids(path) == [proc.pid]
    finally:
        remove_cgroup(LabPaths("hxu").cgroup)
    assert proc.wait(timeout=10) != 0
    assert not LabPaths("hxu").cgroup.exists()


@needs_root
def test_failed_start_removes_what_it_built_and_a_taken_name_is_refused(monkeypatch):
    lab = parse_lab(LAB)
    down(lab.name)

    def broken(*args, **kwargs):
        raise RuntimeError("ray start failed")

    monkeypatch.setattr(launcher, "start_node", broken)
    with pytest.raises(RuntimeError, match="ray start failed"):
        up(lab)
    assert lab_namespaces(lab.name) == [] and not LabPaths(lab.name).cgroup.exists()
    assert not LabPaths(lab.name).state_dir.exists()

    subprocess.run(["ip", "netns", "add", "hxu-h0"], check=True)
    try:
        with pytest.raises(LabError, match="'hxu' is taken"):
            up(lab)
    finally:
        assert down(lab.name) == ["hxu-h0"]


def test_a_group_is_pinned_to_its_plan_node_when_the_cluster_names_nodes():
    from router.launch_ray import placement_bundles

    placement = {"nodes": ["h2"], "gpu_types": {"SLOW": 1}}
    bundles, strategy = placement_bundles(placement, use_gpus=False, named_nodes=frozenset({"h1", "h2"}))
    assert bundles == [{"gpu_type:SLOW": 1.0, "CPU": 1.0, "hexserve_node:h2": 0.001}] and strategy == "STRICT_PACK"
    # A cluster that does not name its nodes: any node of the type will do.
    assert placement_bundles(placement, use_gpus=False)[0] == [{"gpu_type:SLOW": 1.0, "CPU": 1.0}]
    assert named_nodes({"CPU": 2, "gpu_type:SLOW": 1, "hexserve_node:h2": 1000}) == {"h2"}


@needs_root
def test_up_again_writes_the_cluster_file_and_refuses_another_description(monkeypatch, tmp_path):
    lab = parse_lab(LAB)
    down(lab.name)
    monkeypatch.setattr(launcher, "start_node", lambda *args, **kwargs: None)  # the network and devices, no Ray
    try:
        first = up(lab)
        assert "cluster_file" not in first
        again = up(lab, cluster_out=tmp_path / "cluster.json")
        assert again["cluster_file"] == str((tmp_path / "cluster.json").resolve()) and (tmp_path / "cluster.json").exists()
        assert again["started"] == first["started"]  # the running lab, not a new one
        with pytest.raises(LabError, match="is up with another description"):
            up(parse_lab(_with(hosts__1__link_mbit_per_s=50)))
    finally:
        down(lab.name)
    assert lab_namespaces(lab.name) == []


def test_lab_profiles_cover_the_longest_prompt_replayed():
    from lab.profile import profile_args

    args = dict(zip(profile_args(896)[::2], profile_args(896)[1::2]))
    assert args["--prompt-lengths"].endswith(",512,896") and args["--decode-prompt-lengths"] == "32,256,896"
    assert args["--batch-sizes"].split(",")[-1] == "32"
    # never past what the lab engine's window holds with the profile's decode tokens
    assert profile_args(4000)[1].endswith(",960") and profile_args(100)[5] == "32,100"
