from collections import Counter

import pytest

from common.block_hash import block_hashes, block_keys
from common.cache_routing import CacheAwarePolicy, cache_aware_pick, make_policy
from common.prefix_index import PrefixIndex
from common.routing import NoRouteAvailable, RoundRobinPolicy, Route, RoutePolicy

P0, P1 = Route("p0", "d0", 1.0), Route("p1", "d0", 1.0)


def _idle(_w):
    return 0


def _healthy(_w):
    return True


def test_shared_prefix_lands_on_the_worker_that_holds_it_when_loads_are_equal():
    policy = CacheAwarePolicy([P0, P1])
    for _ in range(3):  # whatever the round-robin phase
        choice = policy.pick(_healthy, _idle, num_prompt_tokens=512, cached_tokens={"p1": 256})
        assert choice.route == P1 and choice.prefill_cached_tokens == 256


def test_without_prefixes_cache_aware_stays_within_the_slack_of_the_plan_weights():
    routes = [Route("p0", "d0", 3.0), Route("p1", "d1", 1.0)]
    policy = CacheAwarePolicy(routes, share_slack_requests=8)
    picks = Counter(policy.pick(_healthy, _idle, num_prompt_tokens=100).route for _ in range(400))
    assert abs(picks[routes[1]] - 100) <= 9
    exact = CacheAwarePolicy(routes, share_slack_requests=0)
    picks = Counter(exact.pick(_healthy, _idle, num_prompt_tokens=100).route for _ in range(400))
    assert picks == {routes[0]: 300, routes[1]: 100}


@pytest.mark.parametrize("slack", [0.0, 2.0, 8.0])
def test_a_popular_prefix_cannot_pull_a_route_beyond_the_slack(slack):
    policy = CacheAwarePolicy([P0, P1], share_slack_requests=slack)
    picks = Counter()
    for n in range(1, 201):
        picks[policy.pick(_healthy, _idle, num_prompt_tokens=512, cached_tokens={"p0": 500}).route] += 1
        assert abs(picks[P0] - n / 2) <= slack + 1
    assert picks[P0] > picks[P1] or slack == 0


def test_decode_first_when_decode_holds_all_but_a_short_suffix():
    policy = CacheAwarePolicy([P0], decode_first_max_tokens=64)
    choice = policy.pick(_healthy, _idle, num_prompt_tokens=600, cached_tokens={"d0": 560})
    assert choice.decode_first and choice.decode_cached_tokens == 560
    assert not policy.pick(_healthy, _idle, num_prompt_tokens=600, cached_tokens={"d0": 512}).decode_first
    off = CacheAwarePolicy([P0], decode_first_max_tokens=0)
    assert not off.pick(_healthy, _idle, num_prompt_tokens=600, cached_tokens={"d0": 592}).decode_first


def test_busy_worker_loses_its_cache_advantage():
    policy = CacheAwarePolicy([P0, P1])
    busy = {"p0": 100_000, "p1": 0, "d0": 0}
    choice = policy.pick(_healthy, busy.__getitem__, num_prompt_tokens=512, cached_tokens={"p0": 512})
    assert choice.route == P1


def test_round_robin_ignores_weights_and_load():
    routes = [Route("p0", "d0", 9.0), Route("p1", "d0", 1.0)]
    policy = RoundRobinPolicy(routes)
    busy = {"p0": 0, "p1": 10**6, "d0": 0}
    assert Counter(policy.pick(_healthy, busy.__getitem__).route for _ in range(10)) == {routes[0]: 5, routes[1]: 5}


def test_make_policy_names_and_errors():
    assert type(make_policy("plan", [P0])) is RoutePolicy
    assert isinstance(make_policy("cache-aware", [P0]), CacheAwarePolicy)
    with pytest.raises(ValueError, match="routing='lru' is unknown; use one of cache-aware, plan, round-robin"):
        make_policy("lru", [P0])
    with pytest.raises(NoRouteAvailable):
        make_policy("cache-aware", [P0]).pick(lambda w: False, _idle)


def test_pick_is_bounded_on_both_sides_generic_keys():
    current = {"a": 0.0, "b": 0.0}
    counts = Counter(cache_aware_pick(current, {"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 1.0}, 3.0) for _ in range(100))
    assert counts["a"] - counts["b"] <= 8


def test_index_follows_stored_removed_and_worker_drop():
    tokens = list(range(64))
    chain = block_keys(tokens, 16)
    index = PrefixIndex()
    index.stored("w1", chain[:3], block_size=16)
    index.stored("w2", chain[:1], block_size=16)
    assert index.cached_tokens(["w1", "w2", "w3"], tokens, block_keys) == {"w1": 48, "w2": 16, "w3": 0}
    index.removed("w1", [chain[1]])  # a hole: the prefix stops there, as in vLLM's lookup
    assert index.cached_blocks("w1", chain) == 1
    index.drop_worker("w1")
    assert index.cached_blocks("w1", chain) == 0 and index.num_blocks("w1") == 0
    assert index.cached_blocks("w2", chain) == 1


def test_index_memory_is_bounded_per_worker():
    index = PrefixIndex(max_blocks_per_worker=4)
    chain = block_keys(list(range(160)), 16)
    index.stored("w", chain, block_size=16)
    assert index.num_blocks("w") == 4 and index.cached_blocks("w", chain) == 0  # the oldest went first
    index.drop_worker("w")
    assert not index._holders


def test_block_hashes_match_vllms_function():
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    kv_cache_utils.init_none_hash(sha256)
    tokens = [(i * 7919) % 5000 for i in range(70)]
    parent, expected = None, []
    for start in range(0, 64, 16):
        parent = kv_cache_utils.hash_block_tokens(sha256, parent, tokens[start:start + 16])
        expected.append(parent)
    assert block_hashes(tokens, 16) == expected
    assert block_keys(tokens, 16) == [kv_cache_utils.maybe_convert_block_hash(h) for h in expected]
