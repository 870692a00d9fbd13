"""Choosing a prefill→decode route for each request.

The plan gives each route a weight: its share of the max-flow, i.e. the
fraction of requests the cluster can sustain along it. Weighted choice alone
is blind to bursts (a route whose decode worker is stuck on long outputs keeps
receiving its share), so each weight is divided by a load factor computed
from the tokens already outstanding on the route's two workers:

    effective_weight = weight / (1 + outstanding_tokens / load_scale_tokens)

Selection among effective weights is smooth weighted round robin (nginx's
algorithm): deterministic, and over any window the picks follow the weights
exactly when load is even, which is what a user reading the plan expects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Route:
    prefill_worker: str
    decode_worker: str
    weight: float

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"route {self.prefill_worker}->{self.decode_worker}: weight={self.weight} must be > 0")


class NoRouteAvailable(RuntimeError):
    """Every route has a worker out of rotation."""


@dataclass(slots=True)
class RoutePolicy:
    routes: Sequence[Route]
    load_scale_tokens: float = 4096.0
    _current: dict[Route, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.routes:
            raise ValueError("a cluster needs at least one prefill->decode route")
        self._current = {route: 0.0 for route in self.routes}

    def effective_weight(self, route: Route, outstanding_tokens: Callable[[str], int]) -> float:
        load = outstanding_tokens(route.prefill_worker) + outstanding_tokens(route.decode_worker)
        return route.weight / (1.0 + load / self.load_scale_tokens)

    def choose(
        self,
        is_healthy: Callable[[str], bool],
        outstanding_tokens: Callable[[str], int],
        exclude: frozenset[Route] = frozenset(),
    ) -> Route:
        candidates = [
            r for r in self.routes
            if r not in exclude and is_healthy(r.prefill_worker) and is_healthy(r.decode_worker)
        ]
        if not candidates:
            raise NoRouteAvailable("no healthy prefill->decode route is available")
        weights = {r: self.effective_weight(r, outstanding_tokens) for r in candidates}
        total = sum(weights.values())
        for route, weight in weights.items():
            self._current[route] += weight
        chosen = max(candidates, key=lambda r: self._current[r])
        self._current[chosen] -= total
        return chosen
