"""The simulator's route pickers: the router's policies (common.routing, common.cache_routing) by name.

- "plan": the plan's weights divided by each route's outstanding tokens relative
  to its workers' shares, then smooth weighted round robin (`RoutePolicy`).
- "round-robin": every route in turn, blind to weights and load (`RoundRobinPolicy`).
- "cache-aware": the load-corrected weights as in "plan", and among the routes
  within the share slack the cheapest by `route_cost` given each group's cached
  prefix of the request (`CacheAwarePolicy`); may pick decode-first.
- "weighted": the plan's weights alone (no load term), for comparisons.
- "load_aware": the old name of "plan".

The pickers call the same functions as the router (`smooth_wrr_pick`,
`load_corrected_weight`, `cache_aware_pick`, `route_cost`, `worker_shares`), so
a simulated policy is the router's. A route is an index here; the router's
policies key `Route`s and check worker health, which a simulation does not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.cache_routing import cache_aware_pick, route_cost
from common.routing import load_corrected_weight, smooth_wrr_pick, worker_shares
from planner.sim.types import SimRoute

ROUTINGS = ("cache-aware", "plan", "round-robin", "weighted", "load_aware")
ROUTING_ALIASES = {"load_aware": "plan"}


@dataclass(frozen=True, slots=True)
class Pick:
    route: SimRoute
    decode_first: bool = False  # the decode group computes the uncached suffix; no prefill hop


class RoutePicker:
    """One pick per request over `routes` (those with weight > 0), by policy name (module docstring)."""

    def __init__(self, routes: list[SimRoute], routing: str, load_scale_tokens: float,
                 share_slack_requests: float, decode_first_max_tokens: int) -> None:
        self.routing = ROUTING_ALIASES.get(routing, routing)
        self.routes = [r for r in routes if r.weight > 0]
        total = sum(r.weight for r in self.routes)
        self.weights = [r.weight / total for r in self.routes]
        self.current = {i: 0.0 for i in range(len(self.routes))}
        self.scale = load_scale_tokens
        self.slack = share_slack_requests
        self.decode_first_max_tokens = decode_first_max_tokens
        self.shares = worker_shares((r.prefill, r.decode, r.weight) for r in self.routes) if self.routes else {}
        self.groups = sorted({g for r in self.routes for g in (r.prefill, r.decode)})

    @property
    def wants_prefixes(self) -> bool:
        return self.routing == "cache-aware"

    def _load_corrected(self, outstanding: Mapping[str, int]) -> dict[int, float]:
        return {i: load_corrected_weight(w, [(outstanding[g], self.shares[g]) for g in {r.prefill, r.decode}],
                                         self.scale)
                for i, (w, r) in enumerate(zip(self.weights, self.routes))}

    def pick(self, outstanding: Mapping[str, int], num_prompt_tokens: int = 0,
             cached: Mapping[str, int] | None = None) -> Pick:
        """`outstanding`: tokens routed to each group and not done there; `cached`: prompt tokens of
        this request each group holds (read by "cache-aware" only)."""
        if self.routing == "round-robin":
            return Pick(self.routes[smooth_wrr_pick(self.current, dict.fromkeys(self.current, 1.0))])
        if self.routing == "weighted":
            return Pick(self.routes[smooth_wrr_pick(self.current, dict(enumerate(self.weights)))])
        weights = self._load_corrected(outstanding)
        if self.routing == "plan":
            return Pick(self.routes[smooth_wrr_pick(self.current, weights)])
        costs = {i: route_cost(r.prefill, r.decode, num_prompt_tokens, cached or {}, outstanding.__getitem__,
                               self.shares, self.decode_first_max_tokens)
                 for i, r in enumerate(self.routes)}
        i = cache_aware_pick(self.current, weights, {k: c for k, (c, _) in costs.items()}, self.slack)
        return Pick(self.routes[i], costs[i][1])
