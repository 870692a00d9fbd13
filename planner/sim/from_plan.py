"""Adapter: a planner `Plan` (plan.json) -> the simulator's `SimFleet`.

Per group: each plan stage becomes a cost-model `Stage` with its GPU type's catalog
spec, TP degree and layer count; the link to the next stage is the cluster's
link between the two stages' nodes (intra-node when they share one), as the
planner timed it. KV
capacity is computed from memory left after the weights, as the planner's
memory model does (`Options.usable_bytes`).

Per route: the weight is the plan's max-flow rate on that edge (`rate_rps`:
the share of all requests), falling back to the per-prefill-group `weight`
times the group's load; the KV cost per token is the plan's predicted
transfer time of an average prompt divided by that prompt's length, so the
simulator charges longer prompts proportionally more.

Colocated groups route to themselves.
"""

from __future__ import annotations

from common.plan import Plan
from common.roles import Role
from planner.sim.build import make_group
from planner.sim.types import SimFleet, SimGroup, SimRoute
from planner.spec.catalog import GB, Catalog, default_catalog
from planner.spec.cluster import Cluster, Options
from planner.spec.model import model_from_fields

DEFAULT_INTER_NODE_GB_PER_S = 25.0
DEFAULT_INTER_NODE_LATENCY_US = 15.0


def _node_link(cluster: Cluster | None, a: str, b: str) -> tuple[float, float]:
    """(GB/s, us) between two nodes by name, from the cluster file when given."""
    if cluster is None:
        return DEFAULT_INTER_NODE_GB_PER_S, DEFAULT_INTER_NODE_LATENCY_US
    index = {n.name: n.index for n in cluster.nodes}
    if a not in index or b not in index:
        return DEFAULT_INTER_NODE_GB_PER_S, DEFAULT_INTER_NODE_LATENCY_US
    i, j = index[a], index[b]
    return float(cluster.bandwidth[i, j]) / GB, float(cluster.latency[i, j]) * 1e6


def _group(plan_group, model, catalog: Catalog, options: Options, cluster: Cluster | None) -> SimGroup:
    stages = [(catalog.resolve(s.gpu_type, f"groups[{plan_group.id}].stages.gpu_type"), s.tp,
               s.layers[1] - s.layers[0]) for s in plan_group.stages]
    # Each hop on its own link, as the planner timed it: NVLink within a node, the cluster's link across.
    hops = [_stage_link(cluster, a, b, catalog) for a, b in zip(plan_group.stages, plan_group.stages[1:])]
    return make_group(plan_group.id, plan_group.role, model, stages, options, hops=hops)


def _stage_link(cluster: Cluster | None, a, b, catalog: Catalog) -> tuple[float, float]:
    """(GB/s, us) from plan stage ``a`` to the next stage ``b``."""
    if a.node != b.node:
        return _node_link(cluster, a.node, b.node)
    if cluster is not None and a.node in (index := {n.name: n.index for n in cluster.nodes}):
        i = index[a.node]
        return float(cluster.bandwidth[i, i]) / GB, float(cluster.latency[i, i]) * 1e6
    gpu = catalog.resolve(a.gpu_type, "stage.gpu_type")
    return gpu.intra_node_bandwidth_gb_per_s, gpu.intra_node_latency_us


def fleet_from_plan(plan: Plan, cluster: Cluster | None = None, catalog: Catalog | None = None,
                    options: Options | None = None) -> SimFleet:
    """The simulator's view of `plan`; `cluster` (the file it was solved from) gives links and options."""
    model = model_from_fields(plan.model, "plan.model")
    catalog = catalog or (cluster.catalog if cluster is not None and cluster.catalog else default_catalog())
    options = options or (cluster.options if cluster is not None else Options())
    groups = [_group(g, model, catalog, options, cluster) for g in plan.groups]
    by_id = {g.id: g for g in plan.groups}
    input_mean = float(plan.workload.get("input_tokens_mean") or 1.0)
    routes = []
    for r in plan.routes:
        weight = r.rate_rps if r.rate_rps > 0 else r.weight * max(by_id[r.prefill].load_rps, 1e-9)
        if weight <= 0:
            continue
        routes.append(SimRoute(r.prefill, r.decode, weight, (r.transfer_ms / 1e3) / input_mean, 0.0))
    for g in plan.groups:
        if g.role == Role.COLOCATED:
            routes.append(SimRoute(g.id, g.id, max(g.load_rps, g.capacity_rps, 1e-9), 0.0))
    return SimFleet(plan.cluster, groups, routes, notes={"mode": plan.mode, "predicted": plan.predicted})

