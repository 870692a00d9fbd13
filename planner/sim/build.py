"""Build simulator groups and routes from GPU specs, for plans and for baselines.

A group is a pipeline of stages; each stage is `tp` GPUs of one type holding a
contiguous run of layers. Its KV capacity is what is left of the usable memory
after the weights, on the tightest stage, by the planner's memory model
(`planner.core.costmodel.stage_free_bytes` / `stage_kv_bytes_per_token`). A route's KV cost per token is the
largest shard one GPU of the prefill group sends, over the link between the
two groups (each GPU sends its own shard in parallel, as the cost model says).
"""

from __future__ import annotations

from planner.core import costmodel
from planner.sim.types import SimGroup, SimRoute
from planner.spec.catalog import GB, GpuSpec
from planner.spec.cluster import Options
from planner.spec.model import ModelSpec


def split_layers(num_layers: int, weights: list[float]) -> list[int]:
    """Split layers across stages in proportion to `weights` (e.g. memory), each stage >= 1."""
    total = sum(weights)
    raw = [num_layers * w / total for w in weights]
    out = [max(1, int(r)) for r in raw]
    while sum(out) < num_layers:
        i = max(range(len(out)), key=lambda k: raw[k] - out[k])
        out[i] += 1
    while sum(out) > num_layers:
        i = max(range(len(out)), key=lambda k: out[k] - raw[k] if out[k] > 1 else -1e9)
        out[i] -= 1
    return out


def make_group(
    name: str,
    role: str,
    model: ModelSpec,
    stages: list[tuple[GpuSpec, int, int]],  # (gpu, tp, layers) per pipeline stage
    options: Options | None = None,
    inter_stage_bandwidth_gb_per_s: float = 25.0,
    inter_stage_latency_us: float = 10.0,
    max_prefill_tokens: int = 2048,
    hops: list[tuple[float, float]] | None = None,
) -> SimGroup:
    """A group; raises ValueError when the weights do not fit its memory.

    ``hops``: (GB/s, us) from each stage to the next, when they differ (a plan's stages on one node
    hand over on NVLink, across nodes on the NIC); else every hop is ``inter_stage_*``.
    """
    options = options or Options()
    if sum(layers for _, _, layers in stages) != model.num_layers:
        raise ValueError(f"group {name}: stages hold {sum(s[2] for s in stages)} layers; "
                         f"{model.name} has {model.num_layers}")
    sim_stages = []
    capacity = float("inf")
    for i, (gpu, tp, layers) in enumerate(stages):
        first, last = i == 0, i == len(stages) - 1
        hop_gb_per_s, hop_us = (hops[i] if hops and not last
                                else (inter_stage_bandwidth_gb_per_s, inter_stage_latency_us))
        free = costmodel.stage_free_bytes(model, options.usable_bytes(gpu), tp, layers, first, last)
        if free <= 0:
            raise ValueError(f"group {name}: stage {i} ({tp}x {gpu.name}, {layers} layers) "
                             f"lacks {-free / 2**30:.1f} GiB for the weights")
        capacity = min(capacity, free / costmodel.stage_kv_bytes_per_token(model, layers, tp))
        sim_stages.append(costmodel.Stage(
            gpu=gpu, tp=tp, layers=layers, first=first, last=last,
            intra_bandwidth_bytes_per_s=gpu.intra_node_bytes_per_s, intra_latency_s=gpu.intra_node_latency_s,
            next_bandwidth_bytes_per_s=0.0 if last else hop_gb_per_s * GB,
            next_latency_s=0.0 if last else hop_us / 1e6,
        ))
    return SimGroup(name, role, tuple(sim_stages), max_batch_size=options.max_batch_size,
                    kv_capacity_tokens=int(capacity), max_prefill_tokens=max_prefill_tokens)


def kv_seconds_per_token(model: ModelSpec, prefill: SimGroup, bandwidth_gb_per_s: float) -> float:
    shard = max(costmodel.kv_shard_fraction(model, s.layers, s.tp) for s in prefill.stages)
    return model.kv_bytes_per_token * shard / (bandwidth_gb_per_s * GB)


def make_route(
    model: ModelSpec, prefill: SimGroup, decode: SimGroup, weight: float,
    bandwidth_gb_per_s: float, latency_us: float = 10.0,
) -> SimRoute:
    return SimRoute(prefill.name, decode.name, weight,
                    kv_seconds_per_token(model, prefill, bandwidth_gb_per_s), latency_us / 1e6)
