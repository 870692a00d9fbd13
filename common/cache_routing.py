"""Cache-aware routing: send each request where its prefix already is.

For each healthy route (P, D) the cost of serving the request there is, in
tokens of work per unit of the plan's capacity (`share`, common.routing):

    prefill path:  (outstanding(P) + prompt - cached(P)) / share(P) + outstanding(D) / share(D)
    decode first:  (outstanding(D) + prompt - cached(D)) / share(D)
                   only when prompt - cached(D) <= decode_first_max_tokens

so a prefill worker holding the prefix computes fewer tokens, a busy worker
costs its backlog, and a decode worker that already holds all but a short
suffix of the prompt (the next turn of its own conversation, or a prefix it
received before) computes the suffix itself and the prefill hop is skipped.

Cost alone would pin a popular prefix to one worker and starve the plan, so
the pick keeps smooth weighted round robin's counters (`current`, one per
route: how far the route is behind (+) or ahead (-) of its share, in units of
the total weight, i.e. in requests). The cheapest route is picked among those
less than `share_slack_requests` ahead of their share; a route more than that
behind is picked first. Every route's count therefore stays within a bounded
number of requests of what the plan's weights give (load-corrected as in
the plan policy), so the plan holds in aggregate while prefixes decide
within the slack. Slack 0 is the plan policy; a large slack is pure cost.

`cache_aware_pick` is that step over any keys: the router (`CacheAwarePolicy`)
and the simulator use it alike.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TypeVar

from common.routing import (
    NoRouteAvailable,
    RoundRobinPolicy,
    Route,
    RouteChoice,
    RoutePolicy,
    healthy_candidates,
)

K = TypeVar("K", bound=Hashable)

ROUTING_POLICIES = ("cache-aware", "plan", "round-robin")
DEFAULT_ROUTING = "cache-aware"
DEFAULT_SHARE_SLACK_REQUESTS = 8.0
DEFAULT_DECODE_FIRST_MAX_TOKENS = 64


def cache_aware_pick(
    current: MutableMapping[K, float], weights: Mapping[K, float], costs: Mapping[K, float],
    share_slack_requests: float,
) -> K:
    """One pick: the cheapest key within the share slack (see the module docstring)."""
    total = sum(weights.values())
    for key, weight in weights.items():
        current[key] += weight
    limit = share_slack_requests * total
    owed = max(weights, key=current.__getitem__)
    if current[owed] > limit:
        chosen = owed
    else:
        eligible = [k for k in weights if current[k] > -limit] or [owed]
        chosen = min(eligible, key=lambda k: (costs[k], -current[k]))
    current[chosen] -= total
    return chosen


def route_cost(
    prefill: str, decode: str, num_prompt_tokens: int, cached: Mapping[str, int],
    outstanding_tokens: Callable[[str], float], shares: Mapping[str, float], decode_first_max_tokens: int,
) -> tuple[float, bool]:
    """(cost, decode_first) of serving a request on route prefill->decode (module docstring)."""
    decode_load = outstanding_tokens(decode) / shares[decode]
    held = cached.get(decode, 0)
    suffix = num_prompt_tokens - held
    if prefill != decode and decode_first_max_tokens > 0 and held > 0 and suffix <= decode_first_max_tokens:
        return decode_load + suffix / shares[decode], True
    prefill_cost = (outstanding_tokens(prefill) + num_prompt_tokens - cached.get(prefill, 0)) / shares[prefill]
    return (prefill_cost if prefill == decode else prefill_cost + decode_load), False


@dataclass(slots=True)
class CacheAwarePolicy(RoutePolicy):
    share_slack_requests: float = DEFAULT_SHARE_SLACK_REQUESTS
    # Decode computes the prompt itself when at most this many tokens are not in
    # its cache; 0 turns decode-first off.
    decode_first_max_tokens: int = DEFAULT_DECODE_FIRST_MAX_TOKENS

    def __post_init__(self) -> None:
        RoutePolicy.__post_init__(self)
        if self.share_slack_requests < 0:
            raise ValueError(f"share_slack_requests={self.share_slack_requests} must be >= 0")
        if self.decode_first_max_tokens < 0:
            raise ValueError(f"decode_first_max_tokens={self.decode_first_max_tokens} must be >= 0")

    @property
    def wants_prefixes(self) -> bool:
        return True

    def pick(
        self,
        is_healthy: Callable[[str], bool],
        outstanding_tokens: Callable[[str], int],
        exclude: frozenset[Route] = frozenset(),
        num_prompt_tokens: int = 0,
        cached_tokens: Mapping[str, int] | None = None,
    ) -> RouteChoice:
        cached = cached_tokens or {}
        candidates = healthy_candidates(self.routes, is_healthy, exclude)
        weights = {r: self.effective_weight(r, outstanding_tokens) for r in candidates}
        costs = {r: route_cost(r.prefill_worker, r.decode_worker, num_prompt_tokens, cached, outstanding_tokens,
                               self._shares, self.decode_first_max_tokens) for r in candidates}
        route = cache_aware_pick(self._current, {r: weights[r] for r in candidates},
                                 {r: c for r, (c, _) in costs.items()}, self.share_slack_requests)
        return RouteChoice(
            route=route,
            decode_first=costs[route][1],
            prefill_cached_tokens=cached.get(route.prefill_worker, 0),
            decode_cached_tokens=cached.get(route.decode_worker, 0),
        )


def make_policy(
    name: str, routes, share_slack_requests: float = DEFAULT_SHARE_SLACK_REQUESTS,
    decode_first_max_tokens: int = DEFAULT_DECODE_FIRST_MAX_TOKENS,
) -> RoutePolicy:
    """The routing policy called `name` (one of ROUTING_POLICIES) over `routes`."""
    if name == "plan":
        return RoutePolicy(routes)
    if name == "round-robin":
        return RoundRobinPolicy(routes)
    if name == "cache-aware":
        return CacheAwarePolicy(routes, share_slack_requests=share_slack_requests,
                                decode_first_max_tokens=decode_first_max_tokens)
    raise ValueError(f"routing={name!r} is unknown; use one of {', '.join(ROUTING_POLICIES)}")


__all__ = ["CacheAwarePolicy", "NoRouteAvailable", "ROUTING_POLICIES", "cache_aware_pick", "make_policy", "route_cost"]
