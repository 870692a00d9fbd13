"""The planning problem: fleet, network, model, workload and options, parsed and validated.

``cluster.json`` (schema in the README) is the adapter at the edge; the
planner's core only sees the frozen ``Cluster`` built here. GPUs inside one
node are interchangeable, so a node is described by its type and count and a
group of GPUs is a multiset of (node index, count) parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from planner.spec.calibration import apply_profile_files
from planner.spec.catalog import GB, Catalog, GpuSpec, default_catalog
from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields, read_json_file
from planner.spec.model import ModelSpec, model_preset, parse_model
from planner.spec.workload import Workload, parse_workload

CLUSTER_SCHEMA = "hexserve.cluster"
TOP_FIELDS = frozenset({"schema", "schema_version", "name", "fleet", "network", "model", "workload", "options",
                        "catalog", "calibration", "notes"})


@dataclass(frozen=True, slots=True)
class Node:
    index: int
    name: str
    gpu_type: str
    num_gpus: int
    region: str
    spec: GpuSpec

    @property
    def gpu_names(self) -> list[str]:
        """Its GPUs as plans name them: ``node:index``."""
        return [f"{self.name}:{k}" for k in range(self.num_gpus)]


@dataclass(frozen=True, slots=True)
class Options:
    """Knobs of the cost model and the search, with the defaults the README documents."""

    memory_utilization: float = 0.9  # fraction of device memory vLLM may use (its gpu_memory_utilization)
    activation_reserve_gib: float = 1.0  # per GPU, for activations and the CUDA graph pool; capped at 10% of memory
    max_batch_size: int = 256  # vLLM's max_num_seqs
    ttft_kv_share: float = 0.25  # share of the TTFT slack a KV transfer may take; queueing gets the rest
    max_pipeline_stages: int = 16

    def usable_bytes(self, spec: GpuSpec) -> float:
        reserve = min(self.activation_reserve_gib * 1024**3, 0.1 * spec.memory_bytes)
        return spec.memory_bytes * self.memory_utilization - reserve


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    model: ModelSpec
    workload: Workload
    options: Options = field(default_factory=Options)
    name: str = "cluster"
    # Node-to-node link bandwidth (bytes/s) and latency (s); the diagonal is the intra-node link.
    bandwidth: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    latency: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    # Links between regions are shared pipes: (region a, region b) -> bytes/s each way, both orders present.
    region_bandwidth: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)
    # The catalog the file was read with (its own types, overrides and calibration applied):
    # what a plan of this cluster is simulated and estimated on. None: the default catalog.
    catalog: Catalog | None = field(default=None, repr=False)

    @property
    def num_gpus(self) -> int:
        return sum(n.num_gpus for n in self.nodes)

    @property
    def gpu_names(self) -> list[str]:
        """Every GPU of the fleet as plans name them (``node:index``), node by node."""
        return [gpu for n in self.nodes for gpu in n.gpu_names]

    @property
    def price_per_hour(self) -> float:
        return sum(n.num_gpus * n.spec.price_per_hour for n in self.nodes)

    @property
    def regions(self) -> list[str]:
        return sorted({n.region for n in self.nodes})

    def gpu_types(self) -> list[str]:
        return sorted({n.gpu_type for n in self.nodes})

    def subset(self, counts: dict[int, int], name: str | None = None) -> Cluster:
        """The same problem on only ``counts[node] `` GPUs of each node (nodes left out drop)."""
        keep = [i for i in range(len(self.nodes)) if counts.get(i, 0) > 0]
        nodes = tuple(
            Node(k, self.nodes[i].name, self.nodes[i].gpu_type, counts[i], self.nodes[i].region, self.nodes[i].spec)
            for k, i in enumerate(keep)
        )
        idx = np.array(keep, dtype=int)
        return Cluster(
            nodes=nodes, model=self.model, workload=self.workload, options=self.options,
            name=name or self.name, bandwidth=self.bandwidth[np.ix_(idx, idx)], latency=self.latency[np.ix_(idx, idx)],
            region_bandwidth=self.region_bandwidth, catalog=self.catalog,
        )


@dataclass(frozen=True, slots=True)
class _LinkSpec:
    bandwidth_gb_per_s: float
    latency_us: float


def _read_link(f: Fields) -> _LinkSpec:
    f.check_keys({"bandwidth_gb_per_s", "latency_us", "between"})
    return _LinkSpec(f.number("bandwidth_gb_per_s", above=0), f.number("latency_us", 10.0, minimum=0))


def _parse_nodes(fleet: Fields, catalog: Catalog) -> list[Node]:
    fleet.check_keys({"nodes"})
    nodes: list[Node] = []
    names: set[str] = set()
    for path, entry in fleet.items("nodes", min_items=1):
        f = Fields(entry, path)
        f.check_keys({"name", "gpu_type", "num_gpus", "region", "count"})
        spec = catalog.resolve(f.string("gpu_type"), f.at("gpu_type"))
        num = f.integer("num_gpus", minimum=1, maximum=64)
        count = f.integer("count", 1, minimum=1, maximum=4096)
        region = f.string("region", "default")
        named = f.has("name")
        base = f.string("name", "")
        for k in range(count):
            if not named:
                name = f"{spec.name.lower()}-{len(nodes)}"
            else:
                name = base if count == 1 else f"{base}-{k}"
            if name in names:
                raise PlanInputError(f.at("name"), f"node name {name!r} is used twice; node names must be unique")
            names.add(name)
            nodes.append(Node(len(nodes), name, spec.name, num, region, spec))
    return nodes


@dataclass(frozen=True, slots=True)
class _NetworkSpec:
    """The ``network`` object: per-type intra-node links, defaults, and explicit node or region links."""

    intra: dict[str, _LinkSpec]
    inter_node: _LinkSpec | None
    inter_region: _LinkSpec | None
    node_links: dict[frozenset[str], _LinkSpec]
    region_links: dict[frozenset[str], _LinkSpec]


def _read_network(nodes: list[Node], net: Fields) -> _NetworkSpec:
    net.check_keys({"intra_node", "inter_node", "inter_region", "links"})
    intra = net.obj("intra_node", {})
    intra_links = {name: _read_link(intra.obj(name)) for name in intra.data}
    for name in intra_links:
        if name not in {node.gpu_type for node in nodes}:
            raise PlanInputError(intra.at(name), f"no node has GPU type {name!r}; types in the fleet: "
                                 f"{', '.join(sorted({node.gpu_type for node in nodes}))}")
    regions = {node.region for node in nodes}
    inter = _read_link(net.obj("inter_node")) if net.has("inter_node") else None
    inter_region = _read_link(net.obj("inter_region")) if net.has("inter_region") else None
    names = {node.name for node in nodes}
    node_links: dict[frozenset[str], _LinkSpec] = {}
    region_links: dict[frozenset[str], _LinkSpec] = {}
    for path, entry in net.items("links", []):
        f = Fields(entry, path)
        between = f.raw("between")
        if not (isinstance(between, list) and len(between) == 2 and all(isinstance(x, str) for x in between)):
            raise PlanInputError(f.at("between"), "must be a list of two node names or two region names")
        a, b = between
        link = _read_link(f)
        if a in names and b in names:
            node_links[frozenset((a, b))] = link
        elif a in regions and b in regions:
            region_links[frozenset((a, b))] = link
        else:
            raise PlanInputError(
                f.at("between"), f"{between} must name two nodes ({', '.join(sorted(names)[:6])}...) "
                f"or two regions ({', '.join(sorted(regions))})",
            )
    return _NetworkSpec(intra_links, inter, inter_region, node_links, region_links)


def _pair_link(a: Node, b: Node, same: bool, spec: _NetworkSpec, net: Fields) -> _LinkSpec:
    """The link between two nodes: intra-node, an explicit node or region link, else the defaults."""
    if same:
        return spec.intra.get(a.gpu_type) or _LinkSpec(a.spec.intra_node_bandwidth_gb_per_s, a.spec.intra_node_latency_us)
    if frozenset((a.name, b.name)) in spec.node_links:
        return spec.node_links[frozenset((a.name, b.name))]
    if a.region != b.region and frozenset((a.region, b.region)) in spec.region_links:
        return spec.region_links[frozenset((a.region, b.region))]
    if a.region != b.region:
        if spec.inter_region is None:
            raise PlanInputError(
                net.at("inter_region"),
                f"is required: nodes {a.name!r} ({a.region}) and {b.name!r} ({b.region}) are in different "
                "regions and no entry of network.links joins them",
            )
        return spec.inter_region
    if spec.inter_node is None:
        raise PlanInputError(net.at("inter_node"), "is required when the fleet has more than one node")
    return spec.inter_node


def _link_matrices(nodes: list[Node], net: Fields) -> tuple[np.ndarray, np.ndarray, dict[tuple[str, str], float]]:
    """(bandwidth bytes/s, latency s) between every pair of nodes, and each shared inter-region link."""
    spec = _read_network(nodes, net)
    n = len(nodes)
    bw = np.zeros((n, n))
    lat = np.zeros((n, n))
    for i, a in enumerate(nodes):
        for j, b in enumerate(nodes):
            link = _pair_link(a, b, i == j, spec, net)
            bw[i, j] = link.bandwidth_gb_per_s * GB
            lat[i, j] = link.latency_us * 1e-6
    regions = {node.region for node in nodes}
    shared: dict[tuple[str, str], float] = {}
    for a in regions:
        for b in regions:
            if a != b:
                link = spec.region_links.get(frozenset((a, b)), spec.inter_region)
                if link is not None:
                    shared[(a, b)] = link.bandwidth_gb_per_s * GB
    return bw, lat, shared


def _parse_options(f: Fields) -> Options:
    f.check_keys({"memory_utilization", "activation_reserve_gib", "max_batch_size", "ttft_kv_share",
                  "max_pipeline_stages"})
    d = Options()
    return Options(
        memory_utilization=f.number("memory_utilization", d.memory_utilization, above=0, maximum=1),
        activation_reserve_gib=f.number("activation_reserve_gib", d.activation_reserve_gib, minimum=0),
        max_batch_size=f.integer("max_batch_size", d.max_batch_size, minimum=1),
        ttft_kv_share=f.number("ttft_kv_share", d.ttft_kv_share, above=0, maximum=0.9),
        max_pipeline_stages=f.integer("max_pipeline_stages", d.max_pipeline_stages, minimum=1, maximum=128),
    )


def parse_cluster(data: Any, base_dir: Path | str = ".", catalog: Catalog | None = None) -> Cluster:
    """Validate a parsed cluster.json into a ``Cluster``. Paths inside are relative to ``base_dir``."""
    base_dir = Path(base_dir)
    f = Fields(data, "")
    f.check_keys(TOP_FIELDS)
    if f.has("schema") and f.string("schema") != CLUSTER_SCHEMA:
        raise PlanInputError("schema", f"must be {CLUSTER_SCHEMA!r}")
    if f.has("schema_version") and f.integer("schema_version") != 1:
        raise PlanInputError("schema_version", "this planner reads version 1")
    catalog = catalog or default_catalog()
    if f.has("catalog"):
        catalog = catalog.with_overrides(f.obj("catalog"))
    if f.has("calibration"):
        paths = [(p, Path(v) if Path(v).is_absolute() else base_dir / v) for p, v in f.items("calibration")]
        catalog = apply_profile_files(catalog, paths)
    raw_model = f.raw("model")
    model = (
        model_preset(raw_model, "model") if isinstance(raw_model, str) else parse_model(f.obj("model"), base_dir)
    )
    workload = parse_workload(f.obj("workload"), base_dir)
    nodes = _parse_nodes(f.obj("fleet"), catalog)
    bw, lat, shared = _link_matrices(nodes, f.obj("network", {}))
    return Cluster(
        nodes=tuple(nodes), model=model, workload=workload, options=_parse_options(f.obj("options", {})),
        name=f.string("name", "cluster"), bandwidth=bw, latency=lat, region_bandwidth=shared, catalog=catalog,
    )


def load_cluster(path: Path | str) -> Cluster:
    """Read and validate a cluster file."""
    path = Path(path)
    cluster = parse_cluster(read_json_file(path, what="cluster file"), path.parent)
    if cluster.name == "cluster":
        object.__setattr__(cluster, "name", path.stem)
    return cluster
