"""Small disaggregated plans for this machine: N prefill and M decode CPU groups of the tiny model.

A rehearsal plan (`python -m router serve --plan ... --model <tiny>`): every
group is one CPU worker, every prefill group routes to every decode group
with equal flow. Benchmarks and tests that need more than the embedded
default's one route use it.
"""

from __future__ import annotations

from pathlib import Path

from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from engine.tiny_model import TINY_MODEL_NAME

_TINY_LAYERS = 4


def _group(group_id: str, role: str) -> GroupPlan:
    gpu = f"cpu:{group_id}"
    return GroupPlan(id=group_id, role=role, gpus=[gpu], gpu_types={"CPU": 1}, nodes=["cpu"], region="local",
                     tp=1, pp=1, layer_partition=[_TINY_LAYERS],
                     stages=[StagePlan(node="cpu", gpu_type="CPU", gpus=[gpu], tp=1, layers=[0, _TINY_LAYERS])],
                     capacity_rps=1.0, load_rps=1.0, batch=8, latency_ms=10.0, service_ms=10.0, kv_budget_ms=1.0)


def local_plan(num_prefill: int, num_decode: int) -> Plan:
    """Every prefill group p<i> routes to every decode group d<j>, each route with flow 1."""
    if num_prefill < 1 or num_decode < 1:
        raise ValueError(f"a disaggregated plan needs >= 1 prefill and decode group, got {num_prefill} and {num_decode}")
    prefill = [_group(f"p{i}", "prefill") for i in range(num_prefill)]
    decode = [_group(f"d{j}", "decode") for j in range(num_decode)]
    routes = [RoutePlan(prefill=p.id, decode=d.id, weight=1.0, rate_rps=1.0, kv_gb_per_s=1.0, transfer_ms=1.0)
              for p in prefill for d in decode]
    return Plan(mode="disaggregated", cluster=f"local-{num_prefill}p{num_decode}d", model={"name": TINY_MODEL_NAME},
                workload={}, groups=[*prefill, *decode], routes=routes, unused_gpus=[],
                predicted=Predicted(float(len(routes)), 100.0, 50.0, 10.0, 1.0, 1.0, float(len(routes)), None))


def write_local_plan(folder: Path, num_prefill: int, num_decode: int) -> Path:
    path = Path(folder) / f"plan_{num_prefill}p{num_decode}d.json"
    local_plan(num_prefill, num_decode).write(path)
    return path
