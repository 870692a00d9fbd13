"""Graph partition: spectral order, Kernighan-Lin refinement, group sizes."""

from __future__ import annotations

import networkx as nx

from planner.core.partition import fiedler_order, gpu_graph, node_graph, partition, spectral_bisect
from planner.core.strategy import GroupEvaluator
from planner_factories import make_cluster


def two_cliques() -> nx.Graph:
    g = nx.Graph()
    for a in range(4):
        for b in range(a + 1, 4):
            g.add_edge(a, b, weight=100.0)
            g.add_edge(a + 4, b + 4, weight=100.0)
    g.add_edge(0, 4, weight=1.0)
    return g


def test_fiedler_order_separates_two_cliques():
    order = fiedler_order(two_cliques())
    assert set(order[:4]) in ({0, 1, 2, 3}, {4, 5, 6, 7})


def test_spectral_bisect_cuts_the_weak_edge_even_from_a_bad_start():
    a, b = spectral_bisect(two_cliques(), {v: 1.0 for v in range(8)}, seed=0)
    assert {frozenset(a), frozenset(b)} == {frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7})}


def test_gpu_graph_weights_are_link_bandwidths():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 2}, {"gpu_type": "L40S", "num_gpus": 2}])
    g = gpu_graph(c)
    assert g.number_of_nodes() == 4
    assert g[(0, 0)][(0, 1)]["weight"] == 450.0
    assert g[(1, 0)][(1, 1)]["weight"] == 25.0
    assert g[(0, 0)][(1, 0)]["weight"] == 50.0


def test_partition_keeps_regions_apart_and_groups_feasible():
    c = make_cluster(nodes=[
        {"gpu_type": "H100", "num_gpus": 8, "count": 2, "region": "us"},
        {"gpu_type": "H100", "num_gpus": 8, "count": 2, "region": "eu"},
    ])
    ev = GroupEvaluator(c)
    groups = partition(c, ev, ev.min_replica_bytes() * 2, seed=0)
    assert sum(cnt for g in groups for _, cnt in g) == 32  # every GPU placed
    for g in groups:
        assert len({c.nodes[n].region for n, _ in g}) == 1
        assert ev.memory_bytes(g) >= ev.min_replica_bytes()


def test_partition_granularity_controls_group_size():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 4}])
    ev = GroupEvaluator(c)
    small = partition(c, ev, ev.min_replica_bytes(), seed=0)
    large = partition(c, ev, ev.min_replica_bytes() * 4, seed=0)
    assert len(small) == 16 and all(sum(k for _, k in g) == 2 for g in small)
    assert len(large) < len(small)


def test_partition_joins_small_nodes_into_pipelines():
    c = make_cluster(nodes=[{"gpu_type": "L4", "num_gpus": 4, "count": 4}])  # 96 GiB a node: no 70B replica
    ev = GroupEvaluator(c)
    groups = partition(c, ev, ev.min_replica_bytes(), seed=0)
    assert all(len(g) >= 2 for g in groups)
    assert all(ev.evaluate(g).feasible for g in groups)


def test_node_graph_prefers_same_type_when_bandwidth_ties():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 2}, {"gpu_type": "A100-80G", "num_gpus": 8, "count": 2}])
    g = node_graph(c, [0, 1, 2, 3])
    assert g[0][1]["weight"] > g[0][2]["weight"]
    a, b = spectral_bisect(g, {n: 1.0 for n in range(4)}, seed=0)
    assert {frozenset(a), frozenset(b)} == {frozenset({0, 1}), frozenset({2, 3})}
