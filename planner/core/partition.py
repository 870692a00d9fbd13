"""Graph partition of the GPU fleet into candidate model-serving groups.

The fleet is a graph: GPUs are vertices, links are edges weighted by their
bandwidth. A good group keeps its fast links inside (TP all-reduces, pipeline
hops) and has the memory for one replica. We cut the graph by recursive
spectral bisection (the Fiedler vector of the weighted Laplacian orders the
vertices so that a prefix cut crosses few heavy edges), refine each cut with
Kernighan-Lin, and stop splitting a part when its halves could no longer hold
a replica of the target size.

GPUs inside one node are joined by the node's intra-node link and are
interchangeable, so the recursion runs on the node graph (the GPU graph with
each node's GPUs contracted: a multilevel coarsening, as METIS does) and only
splits inside a node at the end. That keeps 1024-GPU fleets at a few hundred
vertices. Edges between nodes of the same GPU type get a small bonus, so that
when bandwidth does not decide a cut, the cut separates types (a group of one
type has no slow stage to wait for).
"""

from __future__ import annotations

import random

import networkx as nx
import numpy as np

from planner.core.groups import Group
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster

SAME_TYPE_BONUS = 0.05


def gpu_graph(cluster: Cluster, max_edges: int = 200_000) -> nx.Graph:
    """The GPU graph: vertex ``(node, local index)``, edge weight = link bandwidth in GB/s.

    Inter-node edges are left out past ``max_edges`` (a drawing does not need all of them).
    """
    g = nx.Graph()
    for node in cluster.nodes:
        for k in range(node.num_gpus):
            g.add_node((node.index, k), gpu_type=node.gpu_type, region=node.region, node=node.name)
    for node in cluster.nodes:
        w = float(cluster.bandwidth[node.index, node.index]) / 1e9
        for a in range(node.num_gpus):
            for b in range(a + 1, node.num_gpus):
                g.add_edge((node.index, a), (node.index, b), weight=w)
    total = cluster.num_gpus
    if total * total // 2 <= max_edges:
        for x in cluster.nodes:
            for y in cluster.nodes:
                if x.index < y.index:
                    w = float(cluster.bandwidth[x.index, y.index]) / 1e9
                    for a in range(x.num_gpus):
                        for b in range(y.num_gpus):
                            g.add_edge((x.index, a), (y.index, b), weight=w)
    return g


def node_graph(cluster: Cluster, nodes: list[int]) -> nx.Graph:
    """The coarsened graph on ``nodes``: edge weight = GPU pairs * bandwidth (+ same-type bonus)."""
    g = nx.Graph()
    g.add_nodes_from(nodes)
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            na, nb = cluster.nodes[a], cluster.nodes[b]
            w = float(cluster.bandwidth[a, b]) / 1e9 * na.num_gpus * nb.num_gpus
            if na.gpu_type == nb.gpu_type:
                w *= 1 + SAME_TYPE_BONUS
            g.add_edge(a, b, weight=w)
    return g


def fiedler_order(g: nx.Graph) -> list:
    """Vertices sorted by the Fiedler vector of the weighted Laplacian (ties by vertex)."""
    order = list(g.nodes)
    if len(order) <= 2:
        return order
    adj = nx.to_numpy_array(g, nodelist=order, weight="weight")
    lap = np.diag(adj.sum(axis=1)) - adj
    _, vecs = np.linalg.eigh(lap)
    v = vecs[:, 1]
    if v[np.argmax(np.abs(v))] < 0:  # the sign of an eigenvector is arbitrary; fix it
        v = -v
    v = np.round(v, 9)
    return [order[i] for i in sorted(range(len(order)), key=lambda i: (v[i], order[i]))]


def spectral_bisect(g: nx.Graph, weight: dict, seed: int) -> tuple[set, set]:
    """Cut at the Fiedler-order prefix holding half the total ``weight``, then refine with Kernighan-Lin."""
    order = fiedler_order(g)
    total = sum(weight[v] for v in order)
    acc, cut = 0.0, 1
    for i, v in enumerate(order[:-1]):
        acc += weight[v]
        cut = i + 1
        if acc >= total / 2:
            break
    a, b = set(order[:cut]), set(order[cut:])
    if len(g) > 3:
        a, b = nx.community.kernighan_lin_bisection(g, partition=(a, b), weight="weight", max_iter=8, seed=seed)
    return set(a), set(b)


def _chunk_node(node: int, count: int, per_gpu: float, target: float, minimum: float) -> list[Group]:
    """Split one node's GPUs into equal chunks that each reach ``target`` bytes."""
    size = count
    for k in range(1, count + 1):
        if count % k == 0 and k * per_gpu >= target:
            size = k
            break
    groups: list[Group] = [((node, size),) for _ in range(count // size)]
    rest = count - size * len(groups)
    if rest:
        if rest * per_gpu >= minimum or not groups:
            groups.append(((node, rest),))
        else:
            groups[-1] = ((node, size + rest),)
    return groups


def partition(cluster: Cluster, evaluator: GroupEvaluator, target_bytes: float, seed: int = 0) -> list[Group]:
    """Groups of about ``target_bytes`` of usable memory each (never below one replica).

    Returns every GPU in some group, except GPUs that cannot be part of any
    feasible group (the caller reports the fleet as infeasible if none is).
    """
    minimum = evaluator.min_replica_bytes()
    target = max(target_bytes, minimum)
    usable = {n.index: cluster.options.usable_bytes(n.spec) for n in cluster.nodes}
    rng = random.Random(seed)
    out: list[Group] = []

    def memory(counts: dict[int, int]) -> float:
        return sum(c * usable[n] for n, c in counts.items())

    def recurse(counts: dict[int, int]) -> None:
        if len(counts) == 1:
            (node, count), = counts.items()
            if count * usable[node] >= 2 * target:
                out.extend(_chunk_node(node, count, usable[node], target, minimum))
            else:
                out.append(((node, count),))
            return
        if memory(counts) < 2 * target:
            out.append(tuple(sorted(counts.items())))
            return
        nodes = sorted(counts)
        g = node_graph(cluster, nodes)
        a, b = spectral_bisect(g, {n: counts[n] * usable[n] for n in nodes}, rng.randrange(1 << 30))
        ca = {n: counts[n] for n in a}
        cb = {n: counts[n] for n in b}
        if memory(ca) < target or memory(cb) < target:
            # The cut strands one side below a replica: peel nodes off in Fiedler order instead,
            # largest-first, so that each part reaches the target before the next starts.
            parts = _greedy_parts(fiedler_order(g), counts, usable, target)
            if len(parts) == 1:
                out.append(tuple(sorted(counts.items())))
                return
            for part in parts:
                recurse(part)
            return
        recurse(ca)
        recurse(cb)

    recurse({n.index: n.num_gpus for n in cluster.nodes})
    return out


def _greedy_parts(order: list[int], counts: dict[int, int], usable: dict[int, float], target: float) -> list[dict[int, int]]:
    """Consecutive runs of ``order`` that each reach ``target`` (the last run absorbs a short tail)."""
    parts: list[dict[int, int]] = []
    current: dict[int, int] = {}
    mem = 0.0
    for n in order:
        current[n] = counts[n]
        mem += counts[n] * usable[n]
        if mem >= target:
            parts.append(current)
            current, mem = {}, 0.0
    if current:
        if parts:
            parts[-1].update(current)
        else:
            parts.append(current)
    return parts


def minimal_groups(cluster: Cluster, ev: GroupEvaluator, nodes: list[int] | None = None) -> list[Group]:
    """Smallest feasible chunks inside each node; nodes too small are chained with others of their type."""
    groups: list[Group] = []
    leftovers: dict[tuple[str, str], list[int]] = {}
    for n in nodes if nodes is not None else range(len(cluster.nodes)):
        node = cluster.nodes[n]
        size = next((k for k in range(1, node.num_gpus + 1)
                     if node.num_gpus % k == 0 and ev.evaluate(((n, k),)).feasible), None)
        if size is None:
            leftovers.setdefault((node.gpu_type, node.region), []).append(n)
            continue
        groups += [((n, size),)] * (node.num_gpus // size)
    for members in leftovers.values():
        current: list[int] = []
        for n in members:
            current.append(n)
            g = tuple((m, cluster.nodes[m].num_gpus) for m in current)
            if ev.evaluate(g).feasible:
                groups.append(g)
                current = []
    return groups
