"""The plans the lab benchmark serves: ours and three baselines, all for the same lab.

- `hexserve`: `python -m planner solve` on the lab's calibrated cluster file.
- `hexgen-like`: the same planner in colocated mode (`--mode colocated`):
  heterogeneity-aware, but every group serves both phases.
- `distserve-like`: disaggregated, planned as if every device were of the
  lab's most common type (DistServe profiles one GPU type), then served on
  the real devices: each group keeps the hosts the plan gave it.
- `vllm-like`: one colocated replica on every device, equal weights (vLLM's
  data parallelism behind a load balancer).

Every plan is served by the same router with the same settings; only the
plan differs.
"""

from __future__ import annotations

import collections
import copy
import json
import subprocess
import sys
from pathlib import Path

from common.plan import GroupPlan, Plan, Predicted, StagePlan
from lab.cluster_file import cluster_document
from lab.spec import LabSpec

TINY_LAYERS = 4
PLAN_NAMES = ("hexserve", "hexgen-like", "distserve-like", "vllm-like")


def solve(cluster: Path, out: Path, *args: str) -> Path:
    subprocess.run([sys.executable, "-m", "planner", "solve", str(cluster), "--out", str(out), "--quiet", *args],
                   check=True, timeout=600)
    return out


def majority_type(lab: LabSpec) -> str:
    counts = collections.Counter()
    for host in lab.hosts:
        counts[host.gpu_type] += host.num_devices
    return counts.most_common(1)[0][0]


def homogeneous_document(lab: LabSpec, workload: dict) -> dict:
    """The lab's cluster file with every host re-typed as the majority type."""
    document = cluster_document(lab, workload)
    assumed = majority_type(lab)
    for node in document["fleet"]["nodes"]:
        node["gpu_type"] = assumed
    return document


def on_real_devices(plan: dict, lab: LabSpec) -> dict:
    """A plan solved on re-typed hosts, with each group's GPU types put back to its hosts' real ones."""
    plan = copy.deepcopy(plan)
    real = {h.name: h.gpu_type for h in lab.hosts}
    for group in plan["groups"]:
        types = collections.Counter(real[gpu.split(":")[0]] for gpu in group["gpus"])
        group["gpu_types"] = dict(types)
        for stage in group["stages"]:
            stage["gpu_type"] = real[stage["node"]]
    return plan


def replica_per_device(lab: LabSpec, model: dict | None = None, workload: dict | None = None) -> Plan:
    groups = []
    for host in lab.hosts:
        for index in range(host.num_devices):
            gpu = f"{host.name}:{index}"
            groups.append(GroupPlan(
                id=f"r{len(groups)}", role="colocated", gpus=[gpu], gpu_types={host.gpu_type: 1}, nodes=[host.name],
                region="default", tp=1, pp=1, layer_partition=[TINY_LAYERS],
                stages=[StagePlan(node=host.name, gpu_type=host.gpu_type, gpus=[gpu], tp=1, layers=[0, TINY_LAYERS])],
                capacity_rps=1.0, load_rps=1.0, batch=8, latency_ms=0.0, service_ms=0.0, kv_budget_ms=0.0))
    return Plan(mode="colocated", cluster=f"lab-{lab.name}", model=model or {"name": "hexserve-tiny-llama"},
                workload=workload or {},
                groups=groups, routes=[], unused_gpus=[],
                predicted=Predicted(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None),
                solver={"name": "vllm-like: one colocated replica per device, equal weights"})


def write_plans(lab: LabSpec, cluster: Path, workload: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = {"hexserve": solve(cluster, out_dir / "hexserve.plan.json"),
             "hexgen-like": solve(cluster, out_dir / "hexgen-like.plan.json", "--mode", "colocated")}
    homogeneous = out_dir / "homogeneous.cluster.json"
    document = homogeneous_document(lab, workload)
    if lab.profiles:
        document["calibration"] = [str(p.resolve()) for p in lab.profiles.values()]
    homogeneous.write_text(json.dumps(document, indent=1) + "\n")
    assumed = solve(homogeneous, out_dir / "distserve-like.assumed.plan.json", "--mode", "disaggregated")
    plans["distserve-like"] = out_dir / "distserve-like.plan.json"
    plans["distserve-like"].write_text(json.dumps(on_real_devices(json.loads(assumed.read_text()), lab), indent=2) + "\n")
    plans["vllm-like"] = out_dir / "vllm-like.plan.json"
    hexgen = json.loads(plans["hexgen-like"].read_text())  # the same model and workload, for the simulator
    replica_per_device(lab, hexgen["model"], hexgen["workload"]).write(plans["vllm-like"])
    return plans
