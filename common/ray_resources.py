"""The Ray custom resources a hexserve node advertises, and the Ray launcher asks for.

- `gpu_type:<T>`: how many GPUs of catalog type T the node holds
  (`ray start --resources '{"gpu_type:H100": 8}'`).
- `hexserve_node:<name>`: the node is the plan's node <name>; a group the plan
  keeps on that node is placed there, not on any node of the same GPU type
  (which may sit behind another link). Any amount will do: each bundle asks a sliver.
"""

from __future__ import annotations

from collections.abc import Iterable

GPU_TYPE_RESOURCE_PREFIX = "gpu_type:"
NODE_RESOURCE_PREFIX = "hexserve_node:"
NODE_RESOURCE_SHARE = 0.001
NODE_RESOURCE_AMOUNT = 1000.0


def gpu_type_resource(gpu_type: str) -> str:
    return f"{GPU_TYPE_RESOURCE_PREFIX}{gpu_type}"


def node_resource(node: str) -> str:
    return f"{NODE_RESOURCE_PREFIX}{node}"


def named_nodes(resource_names: Iterable[str]) -> frozenset[str]:
    """The plan node names a cluster's nodes advertise (from `ray.cluster_resources()`'s keys)."""
    return frozenset(name[len(NODE_RESOURCE_PREFIX):] for name in resource_names
                     if name.startswith(NODE_RESOURCE_PREFIX))
