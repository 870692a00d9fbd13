"""The plan: what the router consumes. A versioned JSON document plus a readable table.

Schema ``hexserve.plan`` version 1 (documented in the README):

    {"schema": "hexserve.plan", "schema_version": 1, "mode": "disaggregated" | "colocated",
     "cluster": str, "model": {...}, "workload": {...},
     "groups": [{"id": "g0", "role": "prefill" | "decode" | "colocated",
                 "gpus": ["node:idx", ...], "gpu_types": {type: count}, "nodes": [...], "region": str,
                 "tp": int, "pp": int, "layer_partition": [layers per stage],
                 "stages": [{"node": str, "gpu_type": str, "gpus": [...], "tp": int, "layers": [start, end)}],
                 "capacity_rps": float, "load_rps": float, "batch": int,
                 "latency_ms": float, "service_ms": float, "kv_budget_ms": float}],
     "routes": [{"prefill": "g0", "decode": "g3", "weight": float, "rate_rps": float,
                 "kv_gb_per_s": float, "transfer_ms": float}],
     "unused_gpus": ["node:idx", ...],
     "predicted": {"throughput_rps", "output_tokens_per_s", "ttft_ms", "tpot_ms", "cost_per_hour",
                   "tokens_per_dollar", "load_rps", "meets_arrival_rate"},
     "solver": {...}}

Route weights are per prefill group: the weights of the routes leaving one
prefill group sum to 1 (the share of that group's requests each decode group
receives). ``layer_partition`` is what vLLM's ``VLLM_PP_LAYER_PARTITION`` takes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLAN_SCHEMA = "hexserve.plan"
PLAN_SCHEMA_VERSION = 1


@dataclass(slots=True)
class StagePlan:
    node: str
    gpu_type: str
    gpus: list[str]
    tp: int
    layers: list[int]  # [start, end)


@dataclass(slots=True)
class GroupPlan:
    id: str
    role: str
    gpus: list[str]
    gpu_types: dict[str, int]
    nodes: list[str]
    region: str
    tp: int
    pp: int
    layer_partition: list[int]
    stages: list[StagePlan]
    capacity_rps: float
    load_rps: float
    batch: int
    latency_ms: float
    service_ms: float
    kv_budget_ms: float


@dataclass(slots=True)
class RoutePlan:
    prefill: str
    decode: str
    weight: float
    rate_rps: float
    kv_gb_per_s: float
    transfer_ms: float


@dataclass(slots=True)
class Predicted:
    throughput_rps: float
    output_tokens_per_s: float
    ttft_ms: float
    tpot_ms: float
    cost_per_hour: float
    tokens_per_dollar: float
    load_rps: float
    meets_arrival_rate: bool | None
    # Optional (plans written before them lack them): TTFT of the SLO percentile's prompt at load_rps,
    # that percentile, and the share of requests predicted to meet both SLOs.
    ttft_tail_ms: float | None = None
    slo_percentile: float | None = None
    slo_attainment: float | None = None


@dataclass(slots=True)
class Plan:
    mode: str
    cluster: str
    model: dict[str, Any]
    workload: dict[str, Any]
    groups: list[GroupPlan]
    routes: list[RoutePlan]
    unused_gpus: list[str]
    predicted: Predicted
    solver: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        return {"schema": PLAN_SCHEMA, "schema_version": PLAN_SCHEMA_VERSION, **_rounded(body)}

    def write(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @property
    def throughput_rps(self) -> float:
        return self.predicted.throughput_rps


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(float(value), 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def plan_from_json(data: dict[str, Any]) -> Plan:
    """Read a plan file back (the router's entry point). Rejects other schemas and versions."""
    if data.get("schema") != PLAN_SCHEMA:
        raise ValueError(f"schema: expected {PLAN_SCHEMA!r}, got {data.get('schema')!r}")
    if data.get("schema_version") != PLAN_SCHEMA_VERSION:
        raise ValueError(f"schema_version: this reader knows {PLAN_SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    groups = [
        GroupPlan(**{**g, "stages": [StagePlan(**s) for s in g["stages"]]}) for g in data["groups"]
    ]
    return Plan(
        mode=data["mode"], cluster=data["cluster"], model=data["model"], workload=data["workload"], groups=groups,
        routes=[RoutePlan(**r) for r in data["routes"]], unused_gpus=list(data["unused_gpus"]),
        predicted=Predicted(**data["predicted"]), solver=dict(data.get("solver", {})),
    )


def load_plan(path: Path | str) -> Plan:
    with open(path, encoding="utf-8") as fh:
        return plan_from_json(json.load(fh))


def _compact_gpus(gpus: list[str]) -> str:
    """'h100-0:0-3,h100-1:0-1' for a list of node:index names."""
    by_node: dict[str, list[int]] = {}
    for g in gpus:
        node, _, idx = g.rpartition(":")
        by_node.setdefault(node, []).append(int(idx))
    parts = []
    for node, idxs in by_node.items():
        idxs.sort()
        runs, start, prev = [], idxs[0], idxs[0]
        for i in idxs[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            if i is not None:
                start = prev = i
        parts.append(f"{node}:{'/'.join(runs)}")
    return ",".join(parts)


def format_table(plan: Plan, max_groups: int = 40) -> str:
    """A readable summary for stdout."""
    p = plan.predicted
    lines = [
        f"plan for {plan.cluster!r}: model {plan.model['name']}, mode {plan.mode}",
        f"  throughput {p.throughput_rps:.2f} req/s ({p.output_tokens_per_s:.0f} output tok/s); "
        f"TTFT {p.ttft_ms:.0f} ms, TPOT {p.tpot_ms:.1f} ms at {p.load_rps:.2f} req/s",
        f"  cost ${p.cost_per_hour:.2f}/h, {p.tokens_per_dollar:,.0f} output tokens per $",
    ]
    if p.slo_attainment is not None and p.ttft_tail_ms is not None:
        lines.append(f"  TTFT {p.ttft_tail_ms:.0f} ms at the p{p.slo_percentile:g} prompt; "
                     f"{100 * p.slo_attainment:.1f} % of requests predicted to meet both SLOs")
    if p.meets_arrival_rate is not None:
        rate = plan.workload.get("arrival_rate_rps")
        lines.append(f"  arrival rate {rate:.2f} req/s: {'met' if p.meets_arrival_rate else 'NOT met'}")
    header = f"  {'group':<6}{'role':<10}{'gpus':<34}{'tp':>3}{'pp':>3}  {'layers':<18}{'cap r/s':>8}{'load':>8}"
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for g in plan.groups[:max_groups]:
        types = "+".join(f"{c}x{t}" for t, c in g.gpu_types.items())
        gpus = f"{types} {_compact_gpus(g.gpus)}"
        if len(gpus) > 33:
            gpus = gpus[:30] + "..."
        layers = "/".join(str(n) for n in g.layer_partition)
        if len(layers) > 17:
            layers = layers[:14] + "..."
        lines.append(
            f"  {g.id:<6}{g.role:<10}{gpus:<34}{g.tp:>3}{g.pp:>3}  {layers:<18}{g.capacity_rps:>8.2f}{g.load_rps:>8.2f}"
        )
    if len(plan.groups) > max_groups:
        lines.append(f"  ... {len(plan.groups) - max_groups} more groups in the plan file")
    if plan.routes:
        lines += ["", f"  {len(plan.routes)} KV routes; busiest:"]
        for r in sorted(plan.routes, key=lambda r: -r.rate_rps)[:8]:
            lines.append(
                f"    {r.prefill:>5} -> {r.decode:<5} weight {r.weight:.3f}  {r.rate_rps:.2f} req/s  "
                f"{r.kv_gb_per_s:.2f} GB/s  {r.transfer_ms:.1f} ms"
            )
    if plan.unused_gpus:
        lines.append(f"  unused GPUs: {_compact_gpus(plan.unused_gpus)}")
    s = plan.solver
    if s:
        lines.append("")
        lines.append(
            "  solver: " + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list)))
        )
    return "\n".join(lines)
