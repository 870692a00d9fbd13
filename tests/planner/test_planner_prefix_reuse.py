"""The reuse profile of a hash-id trace, and the planner's prefill capacity with a prefix hit fraction."""

from __future__ import annotations

import json

import pytest

from common.roles import Role
from common.traces import TraceRequest
from planner.core.solver import solve
from planner.core.strategy import GroupEvaluator
from planner.spec.errors import PlanInputError
from planner.spec.prefix_reuse import reuse_profile
from planner_factories import make_cluster

BLOCK = 512
WL = {"input_tokens_mean": 4096, "input_tokens_std": 1024, "output_tokens_mean": 128,
      "slo": {"ttft_ms": 4000, "tpot_ms": 100}}
ONE_NODE = [{"gpu_type": "H100", "num_gpus": 8}]


def _trace(num_families=4, per_family=6, shared=6, unique=2):
    reqs, nid = [], 1000
    for k in range(per_family):
        for f in range(num_families):
            ids = tuple(f * 100 + b for b in range(shared)) + tuple(range(nid, nid + unique))
            nid += unique
            reqs.append(TraceRequest(float(len(reqs)), len(ids) * BLOCK, 10, ids))
    return reqs


def test_repeat_fraction_counts_blocks_seen_before():
    reqs = _trace()
    p = reuse_profile(reqs, num_workers=1, cache_tokens_per_worker=10**9)
    # Every family's 6 shared blocks repeat after its first request; unique tails never do.
    repeats = 4 * 5 * 6 * BLOCK
    assert p.repeat_fraction == pytest.approx(repeats / p.prompt_tokens)
    assert p.affinity_hit_fraction == pytest.approx(p.repeat_fraction)


def test_affinity_estimate_is_at_most_the_bound_and_falls_with_capacity():
    reqs = _trace()
    big = reuse_profile(reqs, num_workers=2, cache_tokens_per_worker=10**9)
    small = reuse_profile(reqs, num_workers=2, cache_tokens_per_worker=12 * BLOCK)  # two families do not fit
    assert big.affinity_hit_fraction == pytest.approx(big.repeat_fraction)  # families stick to a worker
    assert 0 < small.affinity_hit_fraction < big.affinity_hit_fraction


def test_a_trace_without_hash_ids_has_no_profile():
    with pytest.raises(ValueError, match="no hash_ids"):
        reuse_profile([TraceRequest(0.0, 100, 10)], 1, 10**6)


def _prefill_capacity(hit=None):
    wl = dict(WL, **({} if hit is None else {"prefix_hit_fraction": hit}))
    c = make_cluster(nodes=ONE_NODE, workload=wl)
    return GroupEvaluator(c).perf(((0, 4),), Role.PREFILL).capacity_rps, c


def test_reuse_is_off_by_default():
    cap_default, c = _prefill_capacity()
    cap_zero, _ = _prefill_capacity(0)
    assert c.workload.prefix_hit_fraction == 0.0
    assert cap_default == cap_zero


def test_a_hit_fraction_raises_predicted_prefill_capacity():
    base, _ = _prefill_capacity()
    half, _ = _prefill_capacity(0.5)
    most, _ = _prefill_capacity(0.8)
    assert base < half < most
    assert half > 1.5 * base  # about half the tokens to compute; the tail prompt is still a full miss


def test_plans_are_byte_identical_without_reuse():
    a = solve(make_cluster(nodes=ONE_NODE, workload=WL), seed=1, time_limit_s=10).to_json()
    b = solve(make_cluster(nodes=ONE_NODE, workload=dict(WL, prefix_hit_fraction=0)), seed=1,
              time_limit_s=10).to_json()
    for doc in (a, b):
        doc["solver"].pop("solve_time_s")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert "prefix_hit_fraction" not in a["workload"]


def test_a_plan_with_reuse_predicts_more_and_says_so():
    base = solve(make_cluster(nodes=ONE_NODE, workload=WL), seed=1, time_limit_s=10)
    reuse = solve(make_cluster(nodes=ONE_NODE, workload=dict(WL, prefix_hit_fraction=0.6)), seed=1, time_limit_s=10)
    assert reuse.workload["prefix_hit_fraction"] == 0.6
    assert reuse.predicted.throughput_rps > base.predicted.throughput_rps


def test_estimate_from_a_trace(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": int(r.arrival_s * 1000), "input_length": r.input_tokens,
                                        "output_length": r.output_tokens, "hash_ids": list(r.hash_ids)}) + "\n"
                            for r in _trace()))
    wl = {"trace": {"path": str(path)}, "slo": {"ttft_ms": 4000, "tpot_ms": 100},
          "prefix_hit_fraction": {"estimate": "upper-bound", "prefill_workers": 2, "cache_tokens_per_worker": 10**6}}
    c = make_cluster(nodes=ONE_NODE, workload=wl)
    assert c.workload.prefix_hit_fraction == pytest.approx(reuse_profile(_trace(), 1, 10**9).repeat_fraction)


@pytest.mark.parametrize("value, message", [
    (1.0, "<= 0.99, got 1"),
    ({"estimate": "affinity", "prefill_workers": 2, "cache_tokens_per_worker": 10**6}, "give workload.trace"),
    ({"estimate": "guess"}, "'guess' is not allowed"),
])
def test_bad_hit_fractions_name_the_field(value, message):
    with pytest.raises(PlanInputError, match=message) as err:
        make_cluster(nodes=ONE_NODE, workload=dict(WL, prefix_hit_fraction=value))
    assert "prefix_hit_fraction" in str(err.value)
