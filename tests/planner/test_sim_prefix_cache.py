"""Prefix caches and cache-aware routing in the simulator, on small hand-built fleets and traces."""

import random

import pytest

from common.cache_routing import make_policy
from common.routing import Route
from loadtest.workload import PlannedRequest
from planner.core.costmodel import Stage
from planner.sim.routing import RoutePicker
from planner.spec.prefix_reuse import PrefixCache, cached_tokens, prompt_blocks
from planner.sim.simulator import SimConfig, simulate, simulate_with_counters
from planner.sim.types import SimFleet, SimGroup, SimRoute
from planner.spec.catalog import default_catalog

BLOCK = 16  # tokens per hash id in these traces


class LinearCosts:
    """Prefill proportional to the tokens computed and their attention pairs; decode constant."""

    def prefill_batch_s(self, group, sum_tokens, sum_sq_tokens, own_step=False):
        t = 1e-4 * sum_tokens + 1e-8 * sum_sq_tokens + 0.01
        return t, t

    def decode_step_s(self, group, batch, sum_context_tokens):
        return 0.01


def _stage():
    return Stage(default_catalog().resolve("H100", "gpu"), 1, 1, True, True, 1e11, 1e-6)


def _fleet(n_prefill=2, n_decode=1, prefill_kv_tokens=1 << 30, decode_kv_tokens=1 << 30):
    groups = [SimGroup(f"p{i}", "prefill", (_stage(),), kv_capacity_tokens=prefill_kv_tokens,
                       max_prefill_tokens=8192) for i in range(n_prefill)]
    groups += [SimGroup(f"d{j}", "decode", (_stage(),), kv_capacity_tokens=decode_kv_tokens)
               for j in range(n_decode)]
    routes = [SimRoute(f"p{i}", f"d{j}", 1.0, 1e-5) for i in range(n_prefill) for j in range(n_decode)]
    return SimFleet("prefix-test", groups, routes)


def _req(i, t, blocks, out=4):
    return PlannedRequest(i, t, len(blocks) * BLOCK, out, hash_ids=tuple(blocks))


def _families(num_families=3, per_family=8, shared_blocks=6, unique_blocks=2, gap_s=0.5):
    """Requests of `num_families` prefixes interleaved (an odd count, so alternating between two groups
    splits every family); each adds its own unique tail blocks."""
    reqs, next_id = [], 10_000
    for k in range(per_family):
        for f in range(num_families):
            tail = list(range(next_id, next_id + unique_blocks))
            next_id += unique_blocks
            shared = [f * 100 + b for b in range(shared_blocks)]
            reqs.append(_req(len(reqs), len(reqs) * gap_s, shared + tail))
    return reqs


def _cfg(routing, **kw):
    return SimConfig(routing=routing, prefix_block_tokens=BLOCK, **kw)


# -- the cache itself ------------------------------------------------------
def test_lru_capacity_is_honoured_and_the_head_of_a_prompt_is_evicted_last():
    cache = PrefixCache(3)
    cache.insert([1, 2])
    cache.insert([3, 4])
    assert len(cache) == 3
    assert 2 not in cache  # the oldest prompt's tail went first
    assert cache.match_blocks([1, 2]) == 1 and cache.match_blocks([3, 4]) == 2
    cache.insert([5, 6, 7, 8, 9])  # longer than the cache: its head stays
    assert len(cache) == 3 and cache.match_blocks([5, 6, 7, 8]) == 3


def test_a_match_stops_at_the_first_missing_block():
    cache = PrefixCache(10)
    cache.insert([1, 3])
    assert cache.match_blocks([1, 2, 3]) == 1 and cache.match_blocks([2, 3]) == 0


def test_a_full_hit_still_computes_one_token_and_clipped_prompts_use_their_own_blocks():
    assert cached_tokens(4, 4 * BLOCK, BLOCK) == 4 * BLOCK - 1
    assert tuple(prompt_blocks((7, 8, 9, 10), 2 * BLOCK + 1, BLOCK)) == (7, 8, 9)


def test_sim_prefill_cache_holds_only_its_capacity():
    # Each prompt is 4 blocks; the prefill group holds 2: a repeat hits exactly its 2 head blocks.
    reqs = [_req(i, i * 1.0, [1, 2, 3, 4]) for i in range(5)]
    fleet = _fleet(n_prefill=1, prefill_kv_tokens=2 * BLOCK, decode_kv_tokens=BLOCK * 100)
    _, counters = simulate_with_counters(fleet, reqs, LinearCosts(), _cfg("plan"))
    assert counters.computed_tokens == 4 * BLOCK + 4 * (2 * BLOCK)
    _, unbounded = simulate_with_counters(_fleet(n_prefill=1), reqs, LinearCosts(), _cfg("plan"))
    assert unbounded.computed_tokens == 4 * BLOCK + 4 * 1  # full hits recompute one token


# -- routing with caches ---------------------------------------------------
def test_cache_aware_computes_fewer_prompt_tokens_than_plan_with_shared_prefixes():
    reqs = _families()
    results = {}
    for routing in ("plan", "round-robin", "cache-aware"):
        records, counters = simulate_with_counters(_fleet(), reqs, LinearCosts(),
                                                   _cfg(routing, decode_first_max_tokens=0))
        assert all(r.success for r in records)
        results[routing] = counters
    prompt = sum(r.input_tokens for r in reqs)
    assert results["plan"].prompt_tokens == results["cache-aware"].prompt_tokens == prompt
    assert results["plan"].computed_tokens < prompt  # plan routing hits too: engines cache anyway
    assert results["cache-aware"].computed_tokens < results["plan"].computed_tokens
    assert results["cache-aware"].hit_rate > results["round-robin"].hit_rate
    # Every family's shared prefix computed once under cache-aware: 3 x 6 blocks, plus every unique tail.
    assert results["cache-aware"].computed_tokens == 3 * 6 * BLOCK + len(reqs) * 2 * BLOCK


def test_cache_aware_keeps_each_family_on_one_prefill_group():
    reqs = _families()
    records = simulate(_fleet(), reqs, LinearCosts(), _cfg("cache-aware", decode_first_max_tokens=0))
    by_family = {}
    for req, rec in zip(reqs, records):
        by_family.setdefault(req.hash_ids[0], set()).add(rec.route.split("->")[0])
    assert all(len(groups) == 1 for groups in by_family.values())
    assert {g for groups in by_family.values() for g in groups} == {"p0", "p1"}  # and the plan's split holds


def test_without_hash_ids_caching_changes_nothing():
    reqs = [PlannedRequest(i, 0.05 * i, 200 + 37 * (i % 5), 3 + i % 4) for i in range(40)]
    runs = []
    for caching in (False, True):
        records, counters = simulate_with_counters(_fleet(), reqs, LinearCosts(),
                                                   _cfg("plan", prefix_caching=caching))
        runs.append([(r.route, r.ttft_s, r.latency_s) for r in records])
        assert counters.computed_tokens == counters.prompt_tokens == sum(r.input_tokens for r in reqs)
    assert runs[0] == runs[1]


def test_with_hash_ids_caching_shortens_prefill_under_plan_routing():
    reqs = _families()
    off = simulate(_fleet(), reqs, LinearCosts(), _cfg("plan", prefix_caching=False))
    on = simulate(_fleet(), reqs, LinearCosts(), _cfg("plan"))
    assert sum(r.ttft_s for r in on) < sum(r.ttft_s for r in off)


def test_load_aware_is_the_old_name_of_plan():
    reqs = _families()
    a = simulate(_fleet(), reqs, LinearCosts(), _cfg("plan"))
    b = simulate(_fleet(), reqs, LinearCosts(), _cfg("load_aware"))
    assert [(r.route, r.ttft_s) for r in a] == [(r.route, r.ttft_s) for r in b]


# -- decode-first ----------------------------------------------------------
@pytest.mark.parametrize("suffix_blocks, threshold, expect_decode_first", [
    (2, 64, True),    # 32 uncached tokens <= 64
    (4, 64, True),    # 64 <= 64: the threshold is inclusive
    (5, 64, False),   # 80 > 64
    (2, 0, False),    # 0 turns decode-first off
])
def test_decode_first_only_within_the_threshold(suffix_blocks, threshold, expect_decode_first):
    head = list(range(6))
    reqs = [_req(0, 0.0, head), _req(1, 1.0, head + list(range(50, 50 + suffix_blocks)))]
    records, counters = simulate_with_counters(_fleet(n_prefill=1), reqs, LinearCosts(),
                                               _cfg("cache-aware", decode_first_max_tokens=threshold))
    assert all(r.success for r in records)
    assert counters.decode_first_requests == int(expect_decode_first)
    computed_on_second = counters.computed_tokens - 6 * BLOCK
    assert computed_on_second == suffix_blocks * BLOCK  # both paths compute only the uncached suffix
    if expect_decode_first:  # no prefill hop and no KV transfer: the first token is the decode group's step
        assert records[1].ttft_s == pytest.approx(LinearCosts().prefill_batch_s(None, suffix_blocks * BLOCK,
                                                  (6 + suffix_blocks) ** 2 * BLOCK**2 - (6 * BLOCK) ** 2)[0])


def test_unknown_block_size_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="prefix_block_tokens=0 must be >= 1"):
        SimConfig(prefix_block_tokens=0)


@pytest.mark.parametrize("routing", ["plan", "round-robin", "cache-aware"])
def test_the_picker_is_the_routers_policy(routing):
    """Given the same backlogs and cached prefixes, the simulator's picker and the router's policy
    (common.cache_routing.make_policy) choose the same routes and the same decode-first flags."""
    sim_routes = [SimRoute(p, d, w, 0.0) for p, d, w in
                  [("p0", "d0", 3.0), ("p0", "d1", 1.0), ("p1", "d0", 1.0), ("p1", "d1", 2.0)]]
    picker = RoutePicker(sim_routes, routing, 4096.0, 2.0, 64)
    policy = make_policy(routing, [Route(r.prefill, r.decode, r.weight) for r in sim_routes],
                         share_slack_requests=2.0, decode_first_max_tokens=64)
    rng = random.Random(7)
    for _ in range(200):
        outstanding = {g: rng.choice([0, 500, 5000, 20000]) for g in ("p0", "p1", "d0", "d1")}
        prompt = rng.choice([100, 1000, 4000])
        cached = {g: rng.choice([0, prompt // 2, prompt - 32, prompt - 200]) for g in outstanding}
        mine = picker.pick(outstanding, prompt, cached)
        theirs = policy.pick(lambda w: True, outstanding.__getitem__, num_prompt_tokens=prompt, cached_tokens=cached)
        assert (mine.route.prefill, mine.route.decode, mine.decode_first) == \
            (theirs.route.prefill_worker, theirs.route.decode_worker, theirs.decode_first)
