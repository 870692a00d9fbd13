from collections import Counter

import pytest

from common.routing import NoRouteAvailable, Route, RoutePolicy

ROUTES = [Route("p0", "d0", 3.0), Route("p1", "d1", 1.0)]


def _idle(_worker):
    return 0


def _all_healthy(_worker):
    return True


def test_picks_follow_plan_weights_exactly_when_idle():
    policy = RoutePolicy(ROUTES)
    picks = Counter(policy.choose(_all_healthy, _idle) for _ in range(400))
    assert picks == {ROUTES[0]: 300, ROUTES[1]: 100}


def test_smooth_interleaving_not_bursts():
    policy = RoutePolicy(ROUTES)
    sequence = [policy.choose(_all_healthy, _idle) for _ in range(8)]
    # Weighted round robin interleaves: the light route appears once in every 4 picks.
    assert sequence[:4].count(ROUTES[1]) == 1 and sequence[4:].count(ROUTES[1]) == 1


def test_live_load_shifts_traffic_away_from_busy_route():
    policy = RoutePolicy(ROUTES, load_scale_tokens=1000)
    busy = {"p0": 0, "d0": 20_000, "p1": 0, "d1": 0}
    picks = Counter(policy.choose(_all_healthy, busy.__getitem__) for _ in range(100))
    assert picks[ROUTES[1]] > picks[ROUTES[0]]


def test_unhealthy_workers_are_skipped():
    policy = RoutePolicy(ROUTES)
    healthy = {"p0": True, "d0": False, "p1": True, "d1": True}
    assert {policy.choose(healthy.__getitem__, _idle) for _ in range(10)} == {ROUTES[1]}


def test_no_healthy_route_raises():
    policy = RoutePolicy(ROUTES)
    with pytest.raises(NoRouteAvailable):
        policy.choose(lambda w: w.startswith("p"), _idle)


def test_exclude_skips_the_failed_route():
    policy = RoutePolicy(ROUTES)
    assert policy.choose(_all_healthy, _idle, exclude=frozenset({ROUTES[0]})) == ROUTES[1]


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="weight"):
        Route("p", "d", 0.0)
    with pytest.raises(ValueError, match="at least one"):
        RoutePolicy([])


def test_backlog_in_proportion_to_weights_keeps_the_planned_split():
    # The 3x route holds 3x the tokens: both are equally busy for their size.
    policy = RoutePolicy(ROUTES, load_scale_tokens=1000)
    busy = {"p0": 0, "d0": 6000, "p1": 0, "d1": 2000}
    picks = Counter(policy.choose(_all_healthy, busy.__getitem__) for _ in range(400))
    assert picks == {ROUTES[0]: 300, ROUTES[1]: 100}


def test_a_shared_decode_worker_weighs_on_its_routes_equally():
    routes = [Route("p0", "d0", 2.0), Route("p1", "d0", 1.0)]
    policy = RoutePolicy(routes, load_scale_tokens=1000)
    busy = {"p0": 0, "p1": 0, "d0": 50_000}
    picks = Counter(policy.choose(_all_healthy, busy.__getitem__) for _ in range(300))
    assert picks == {routes[0]: 200, routes[1]: 100}


def test_colocated_route_counts_its_worker_once():
    single = RoutePolicy([Route("c0", "c0", 1.0)], load_scale_tokens=1000)
    assert single.effective_weight(single.routes[0], lambda w: 1000) == pytest.approx(0.5)
