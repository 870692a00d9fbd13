"""Max-flow network: the proportional fast path, the general solver, routes over slow links."""

from __future__ import annotations

import pytest

from planner.core.flow import RouteTable, _networkx_flow, max_flow
from planner.core.strategy import GroupEvaluator
from planner_factories import make_cluster


def test_general_flow_respects_capacities_and_finds_the_cut():
    result = _networkx_flow([3.0, 2.0], [1.0, 10.0], {(0, 0): 5.0, (1, 1): 0.5, (0, 1): 1.0})
    # P0 -> D0 is capped by D0 (1.0), P0 -> D1 by the route (1.0), P1 -> D1 by the route (0.5).
    assert result.value_rps == pytest.approx(2.5)
    assert result.route_bound
    for (i, j), f in result.flows.items():
        assert f <= {(0, 0): 1.0, (1, 1): 0.5, (0, 1): 1.0}[(i, j)] + 1e-6


def test_fast_path_equals_networkx_when_routes_cannot_bind():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 2}])
    ev, routes = GroupEvaluator(c), RouteTable(c)
    pre = [(g, ev.evaluate(g).prefill) for g in (((0, 2),), ((0, 4),))]
    dec = [(g, ev.evaluate(g).decode) for g in (((1, 4),), ((1, 2),), ((0, 2),))]
    fast = max_flow(pre, dec, routes)
    assert not fast.route_bound
    general = _networkx_flow([p.capacity_rps for _, p in pre], [d.capacity_rps for _, d in dec],
                             {(i, j): 1e9 for i in range(2) for j in range(3)})
    assert fast.value_rps == pytest.approx(general.value_rps, rel=1e-5)
    for i in range(2):  # proportional flows never exceed a group's capacity
        assert sum(f for (a, _), f in fast.flows.items() if a == i) <= pre[i][1].capacity_rps + 1e-9
    for j in range(3):
        assert sum(f for (_, b), f in fast.flows.items() if b == j) <= dec[j][1].capacity_rps + 1e-9


def test_route_over_a_slow_link_is_slower_and_can_bind():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "region": "us"},
                            {"gpu_type": "H100", "num_gpus": 8, "region": "us"},
                            {"gpu_type": "H100", "num_gpus": 8, "region": "eu"}])
    ev, routes = GroupEvaluator(c), RouteTable(c)
    p = ev.evaluate(((0, 4),)).prefill
    local = routes.route(((0, 4),), p, ((0, 4),), ev.evaluate(((0, 4),)).decode)
    near = routes.route(((0, 4),), p, ((1, 4),), ev.evaluate(((1, 4),)).decode)
    far = routes.route(((0, 4),), p, ((2, 4),), ev.evaluate(((2, 4),)).decode)
    assert local.transfer_s < near.transfer_s < far.transfer_s
    assert far.capacity_rps < p.capacity_rps  # 0.5 GB/s cannot carry a 70B prefill group's KV
    kv = c.model.kv_bytes_per_token * 1024
    # Each of the prefill group's GPUs sends its quarter of the layers' KV (TP 1, 4 stages) in parallel.
    expected = kv * max(st.num_layers for st in p.stages) / 80 / 0.5e9
    assert far.transfer_s == pytest.approx(expected + 0.03, rel=1e-6)


def test_flow_is_zero_without_both_roles():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 4}])
    ev = GroupEvaluator(c)
    assert max_flow([(((0, 4),), ev.evaluate(((0, 4),)).prefill)], [], RouteTable(c)).value_rps == 0.0
