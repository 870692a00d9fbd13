"""Per-group strategies: the layer-split DP, TP choices, and the memory and SLO bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from common.roles import Role
from planner.core import costmodel as cm
from planner.core.layer_split import min_bottleneck_split
from planner.core.strategy import GroupEvaluator
from planner.sim.build import make_group
from planner_factories import make_cluster


def brute_force(costs: np.ndarray, total: int) -> float:
    best = np.inf
    n = costs.shape[0]
    for cuts in itertools.combinations(range(1, total), n - 1):
        split = np.diff((0,) + cuts + (total,))
        best = min(best, max(costs[i, k] for i, k in enumerate(split)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_split_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    stages, total = 3, 12
    per_layer = rng.uniform(0.5, 3.0, size=stages)
    costs = np.outer(per_layer, np.arange(total + 1)) + rng.uniform(0, 2, size=(stages, 1))
    limit = rng.integers(4, 9, size=stages)
    costs[np.arange(total + 1)[None, :] > limit[:, None]] = np.inf
    costs[:, 0] = np.inf
    found = min_bottleneck_split(costs, total)
    expect = brute_force(costs, total)
    if not np.isfinite(expect):
        assert found is None
    else:
        value, split = found
        assert value == pytest.approx(expect)
        assert sum(split) == total and all(k >= 1 for k in split)
        assert max(costs[i, k] for i, k in enumerate(split)) == pytest.approx(value)


def test_dp_rejects_more_stages_than_layers():
    assert min_bottleneck_split(np.ones((5, 4)), 3) is None


def test_heterogeneous_pipeline_gives_faster_gpus_more_layers():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 2}, {"gpu_type": "L40S", "num_gpus": 2}])
    perf = GroupEvaluator(c).evaluate(((0, 2), (1, 2)))
    layers = {}
    for st in perf.prefill.stages:
        layers.setdefault(st.part, []).append(st.num_layers)
    assert min(layers[0]) > max(layers[1])  # H100 stages carry more of the 80 layers
    assert sum(st.num_layers for st in perf.prefill.stages) == 80
    assert all(st.tp == perf.prefill.tp for st in perf.prefill.stages)  # one TP per vLLM instance


def test_decode_batch_is_bounded_by_kv_memory_and_tpot():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 2}])
    ev = GroupEvaluator(c)
    d = ev.evaluate(((0, 2),)).decode
    # 2x80 GiB hold the 70B weights (~128 GiB) and KV for only a few dozen 1152-token requests.
    free = 2 * c.options.usable_bytes(c.nodes[0].spec) - c.model.weight_bytes
    per_request = (1024 + 128) * c.model.kv_bytes_per_token
    assert d.batch <= free / per_request
    assert d.batch >= 0.8 * free / per_request
    assert d.latency_s <= c.workload.tpot_slo_s
    tight = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8}],
                         workload={"input_tokens_mean": 1024, "output_tokens_mean": 256,
                                   "slo": {"ttft_ms": 2000, "tpot_ms": 30}})
    t = GroupEvaluator(tight).evaluate(((0, 8),)).decode
    assert t.latency_s <= 0.030
    assert t.batch < GroupEvaluator(make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8}])).evaluate(
        ((0, 8),)).decode.batch


def test_prefill_capacity_respects_the_ttft_slo():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 4}])
    p = GroupEvaluator(c).evaluate(((0, 4),)).prefill
    assert p.ttft_s + p.kv_budget_s == pytest.approx(c.workload.ttft_slo_s, rel=1e-6)
    assert p.capacity_rps < 1 / p.service_s


def test_group_too_small_reports_its_shortfall():
    c = make_cluster(nodes=[{"gpu_type": "L4", "num_gpus": 4}])
    perf = GroupEvaluator(c).evaluate(((0, 4),))
    assert not perf.feasible
    assert perf.memory_shortfall_bytes > 30 * 1024**3


def test_tp_options_follow_head_counts():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8}], model="OPT-30B")
    ev = GroupEvaluator(c)
    assert ev.tp_options(((0, 8),)) == [1, 2, 4, 8]  # 56 heads: divisible by 8
    assert ev.tp_options(((0, 6),)) == [1, 2]  # 56 % 3 != 0


def test_colocated_capacity_is_below_either_phase_alone():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 4}])
    ev = GroupEvaluator(c)
    perf = ev.evaluate(((0, 4),))
    colocated = ev.colocated(((0, 4),))
    assert colocated is not None
    assert colocated.capacity_rps < min(perf.prefill.capacity_rps, perf.decode.capacity_rps)
    assert colocated.latency_s <= c.workload.tpot_slo_s + 1e-9
    assert colocated.ttft_s <= c.workload.ttft_slo_s + 1e-9
    assert ev.perf(((0, 4),), Role.COLOCATED) is colocated
    assert ev.perf(((0, 4),), Role.PREFILL) is perf.prefill and ev.perf(((0, 4),), Role.DECODE) is perf.decode


def test_evaluations_are_cached_by_shape():
    c = make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 8, "count": 4}])
    ev = GroupEvaluator(c)
    for node in range(4):
        ev.evaluate(((node, 4),))
    assert ev.evaluations == 1


def test_planner_and_simulator_count_replicated_kv_heads_alike():
    """8 query heads, 2 KV heads: at tp 4 every KV head lives on two ranks, so a stage holds half the tokens."""
    model = {"name": "gqa-2kv", "num_layers": 16, "hidden_size": 1024, "num_attention_heads": 8,
             "num_key_value_heads": 2, "intermediate_size": 4096, "vocab_size": 32000}
    c = make_cluster(nodes=[{"gpu_type": "L4", "num_gpus": 4}], model=model, options={"max_batch_size": 100_000})
    usable = c.options.usable_bytes(c.nodes[0].spec)
    free = 4 * usable - cm.stage_weight_bytes(c.model, 16, True, True)
    replicated_per_token = 2 * 16 * c.model.kv_bytes_per_token_per_layer
    # The simulator's group...
    group = make_group("d", "decode", c.model, [(c.nodes[0].spec, 4, 16)], c.options)
    assert group.kv_capacity_tokens == int(free / replicated_per_token)
    # ... and the planner's batch bound for the same stage read the same memory model.
    ev = GroupEvaluator(c)
    batch = ev._max_batch_for_split(((0, 4),), 4, ev.slots(((0, 4),), 4), [16])
    assert batch == int(free // (cm.kv_alloc_tokens(c.workload) * replicated_per_token))
    assert batch * cm.kv_alloc_tokens(c.workload) <= group.kv_capacity_tokens
    # At tp 2 (= KV heads) nothing is replicated.
    assert cm.stage_kv_bytes_per_token(c.model, 16, 2) == 16 * c.model.kv_bytes_per_token_per_layer
