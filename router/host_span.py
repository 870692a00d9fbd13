"""A plan group whose pipeline stages sit on several hosts: one engine across them.

vLLM runs such an engine with its multiprocessing executor over `nnodes`
hosts (`--nnodes/--node-rank/--master-addr`; its Ray executor refuses the
CPU platform, docs/lab.md): host 0 runs the engine (our worker, with its
control endpoint), every other host runs its ranks headless
(engine.headless). Ranks are laid out as vLLM does, host by host: host k
runs ranks k*r .. k*r + r - 1, r = ranks / nnodes, so every host must hold
the same number of ranks and a host's stages must be consecutive.

The Ray launcher places one actor per host, each pinned to its node. Every
rank's KV receiver listens on its own host, so a decode engine's kv_endpoint
is the list of every rank's endpoint (kvtransfer.rank_endpoint_list), known
only once each host's actor has chosen its ports: the actors are made
first, then told what the hosts share (`shared_fields`), then launched.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.ray_resources import NODE_RESOURCE_SHARE, gpu_type_resource, node_resource
from common.sockets import tcp_address
from engine.worker_spec import WorkerSpec
from kvtransfer import rank_endpoint, rank_endpoint_list


@dataclass(frozen=True, slots=True)
class HostShare:
    """One host's part of an engine that spans hosts: its node, devices and ranks."""

    node: str
    gpu_type: str
    devices: int
    ranks: int


def host_shares(worker_id: str, placement: dict, num_ranks: int) -> list[HostShare] | None:
    """Each host's share of the worker's engine, in rank order; None when it runs on one host.
    Raises ValueError for a layout vLLM's multi-host executor cannot run."""
    stages = placement.get("stages") or []
    if num_ranks <= 1 or len({stage["node"] for stage in stages}) <= 1:
        return None
    shares: list[HostShare] = []
    for stage in stages:
        if shares and shares[-1].node == stage["node"]:
            last = shares[-1]
            shares[-1] = HostShare(last.node, last.gpu_type, last.devices + stage["gpus"], last.ranks + stage["ranks"])
        elif any(share.node == stage["node"] for share in shares):
            raise ValueError(f"worker {worker_id}: its stages come back to node {stage['node']}; one engine "
                             f"across hosts needs each host's stages consecutive")
        else:
            shares.append(HostShare(stage["node"], stage["gpu_type"], stage["gpus"], stage["ranks"]))
    if sum(share.ranks for share in shares) != num_ranks:
        raise ValueError(f"worker {worker_id}: its stages hold {sum(s.ranks for s in shares)} ranks, "
                         f"its engine {num_ranks}")
    if len({share.ranks for share in shares}) > 1:
        held = ", ".join(f"{share.node}: {share.ranks}" for share in shares)
        raise ValueError(f"worker {worker_id}: its hosts hold different numbers of ranks ({held}); vLLM's "
                         f"multi-host executor runs as many on every host. Re-solve with equal stages per host, "
                         f"or with options.max_pipeline_stages 1 to keep groups within one host")
    return shares


def host_bundles(shares: list[HostShare], use_gpus: bool, named: frozenset[str]) -> list[dict[str, float]]:
    """One bundle per host (placed STRICT_SPREAD), each on its plan node where the cluster names its nodes."""
    bundles = []
    for share in shares:
        bundle = {gpu_type_resource(share.gpu_type): float(share.devices), "CPU": 1.0}
        if use_gpus:
            bundle["GPU"] = float(share.devices)
        if share.node in named:
            bundle[node_resource(share.node)] = NODE_RESOURCE_SHARE
        bundles.append(bundle)
    return bundles


def shared_fields(bound: list[WorkerSpec], master_port: int) -> dict:
    """What every host's process of one engine must agree on, from each host's spec as its
    actor bound it (in host order): every rank's KV endpoint, the host count, where the ranks
    meet (host 0's address), and the KV blocks the smallest host holds (vLLM sizes every
    rank's cache alike)."""
    fields: dict = {"nnodes": len(bound), "master_endpoint": f"tcp://{host_address(bound[0])}:{master_port}"}
    if bound[0].kv_endpoint is not None:
        per_host = bound[0].num_ranks // len(bound)
        fields["kv_endpoint"] = rank_endpoint_list(
            [rank_endpoint(spec.kv_endpoint, rank) for spec in bound for rank in range(per_host)])
    blocks = [spec.kv_cache_blocks for spec in bound if spec.kv_cache_blocks is not None]
    if blocks:
        fields["kv_cache_blocks"] = min(blocks)
    return fields


def host_address(spec: WorkerSpec) -> str:
    """The address a host's actor bound the worker on (its control endpoint's host)."""
    return tcp_address(spec.control_endpoint)[0]


def host_network_env(node_ip: str) -> tuple[tuple[str, str], ...]:
    """How a host's ranks reach the others: vLLM's own address, and gloo's interface (gloo
    otherwise takes the host name's address, which a network namespace need not hold)."""
    import psutil

    env = [("VLLM_HOST_IP", node_ip)]
    for interface, addresses in psutil.net_if_addrs().items():
        if any(address.address == node_ip for address in addresses):
            env.append(("GLOO_SOCKET_IFNAME", interface))
            break
    return tuple(env)
