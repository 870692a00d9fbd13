"""Choosing a prefill→decode route for each request.

The plan gives each route a weight: its share of the max-flow, i.e. the
fraction of requests the cluster can sustain along it. Weighted choice alone
is blind to bursts (a route whose decode worker is stuck on long outputs keeps
receiving its share), so each weight is divided by a load factor computed
from the tokens already outstanding on the route's workers, each relative
to the share of the plan's flow that worker carries:

    effective_weight = weight / (1 + sum over the route's workers of
                                     outstanding_tokens(w) / (load_scale_tokens * share(w)))

where share(w) is the flow through w over the mean flow through a worker.
A worker the plan sized for three times the mean flow is expected to hold
three times the tokens, so backlogs in proportion to the plan leave the split
as planned, and a decode worker shared by several routes weighs on them
equally. (A single global scale sent requests to the least-loaded replica
regardless of its speed; in simulation that cost heterogeneous colocated
plans 20-30 % of their rate.)

Selection among effective weights is smooth weighted round robin (nginx's
algorithm): deterministic, and over any window the picks follow the weights
exactly when load is even, which is what a user reading the plan expects.
`smooth_wrr_pick` is that step alone; the router (`RoutePolicy`) and the
simulator (`planner.sim.simulator`) both pick with it.

Three policies, by name (`--routing`): "plan" is the above; "round-robin"
cycles through the healthy routes ignoring weights and load (a baseline);
"cache-aware" (common.cache_routing) also knows each worker's cached prefix
of the request and picks the cheapest route within a bounded deviation from
the plan's shares.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Route:
    prefill_worker: str
    decode_worker: str
    weight: float

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"route {self.prefill_worker}->{self.decode_worker}: weight={self.weight} must be > 0")


def worker_shares(routes: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """Flow through each worker over the mean flow through a worker, from (prefill, decode, weight)."""
    flow: dict[str, float] = defaultdict(float)
    for prefill, decode, weight in routes:
        flow[prefill] += weight
        if decode != prefill:
            flow[decode] += weight
    mean = sum(flow.values()) / len(flow)
    return {worker: f / mean for worker, f in flow.items()}


def load_corrected_weight(weight: float, loads: Iterable[tuple[float, float]], load_scale_tokens: float) -> float:
    """A route's weight divided by its workers' backlogs, each as (outstanding tokens, share)."""
    return weight / (1.0 + sum(tokens / (load_scale_tokens * share) for tokens, share in loads))


def smooth_wrr_pick(current: MutableMapping[K, float], weights: Mapping[K, float]) -> K:
    """One pick of smooth weighted round robin among the keys of `weights` (nginx's algorithm).

    Every candidate's counter in `current` (kept by the caller between picks)
    grows by its weight; the largest counter wins (the first in `weights`'
    order among equals) and pays back the sum of the weights.
    """
    total = sum(weights.values())
    for key, weight in weights.items():
        current[key] += weight
    chosen = max(weights, key=current.__getitem__)
    current[chosen] -= total
    return chosen


class NoRouteAvailable(RuntimeError):
    """Every route has a worker out of rotation."""


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """Where one request goes. With `decode_first` the decode worker computes the
    prompt itself (it holds all but a short suffix of it) and no prefill runs."""

    route: Route
    decode_first: bool = False
    prefill_cached_tokens: int = 0  # the index's view when the choice was made
    decode_cached_tokens: int = 0


def healthy_candidates(
    routes: Sequence[Route], is_healthy: Callable[[str], bool], exclude: frozenset[Route],
) -> list[Route]:
    candidates = [
        r for r in routes
        if r not in exclude and is_healthy(r.prefill_worker) and is_healthy(r.decode_worker)
    ]
    if not candidates:
        raise NoRouteAvailable("no healthy prefill->decode route is available")
    return candidates


@dataclass(slots=True)
class RoutePolicy:
    routes: Sequence[Route]
    load_scale_tokens: float = 4096.0
    _current: dict[Route, float] = field(default_factory=dict)
    _shares: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.routes:
            raise ValueError("a cluster needs at least one prefill->decode route")
        self._current = {route: 0.0 for route in self.routes}
        self._shares = worker_shares((r.prefill_worker, r.decode_worker, r.weight) for r in self.routes)

    def effective_weight(self, route: Route, outstanding_tokens: Callable[[str], int]) -> float:
        workers = {route.prefill_worker, route.decode_worker}  # a colocated route is one worker
        loads = [(outstanding_tokens(w), self._shares[w]) for w in workers]
        return load_corrected_weight(route.weight, loads, self.load_scale_tokens)

    def choose(
        self,
        is_healthy: Callable[[str], bool],
        outstanding_tokens: Callable[[str], int],
        exclude: frozenset[Route] = frozenset(),
    ) -> Route:
        candidates = healthy_candidates(self.routes, is_healthy, exclude)
        weights = {r: self.effective_weight(r, outstanding_tokens) for r in candidates}
        return smooth_wrr_pick(self._current, weights)

    def pick(
        self,
        is_healthy: Callable[[str], bool],
        outstanding_tokens: Callable[[str], int],
        exclude: frozenset[Route] = frozenset(),
        num_prompt_tokens: int = 0,
        cached_tokens: Mapping[str, int] | None = None,
    ) -> RouteChoice:
        """The policy interface the router calls; the plan policy ignores prefixes."""
        return RouteChoice(self.choose(is_healthy, outstanding_tokens, exclude))

    @property
    def wants_prefixes(self) -> bool:
        """Whether `pick` reads `cached_tokens` (the router skips the lookup otherwise)."""
        return False


@dataclass(slots=True)
class RoundRobinPolicy(RoutePolicy):
    """Every healthy route in turn, blind to weights and load: the baseline."""

    def effective_weight(self, route: Route, outstanding_tokens: Callable[[str], int]) -> float:
        return 1.0
