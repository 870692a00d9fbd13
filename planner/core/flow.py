"""Max-flow over the prefill -> KV route -> decode network.

    source --(prefill capacity)--> P_i --(KV route capacity)--> D_j --(decode capacity)--> sink

Routes between regions also pass through the link between the two regions,
which all of them share (a vertex with the link's capacity in requests/s).

Capacities are requests/s. A route P_i -> D_j exists when the KV cache of an
average prompt crosses the link between the two groups within P_i's share of
the TTFT SLO; its capacity is the link's transfer rate in requests/s. The
max-flow value is the cluster's predicted throughput and the flow on each
route, normalised per prefill group, is the weight the router uses.

When every route exists and none can bind (each carries at least
``min(cap P_i, cap D_j)``), the max flow is ``min(sum P, sum D)`` and the
proportional flow ``f_ij = F * (P_i / sum P) * (D_j / sum D)`` attains it
(and spreads load evenly); that case skips the general solver. Otherwise
networkx's preflow-push runs on integer capacities (micro-requests/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx

from planner.core import costmodel as cm
from planner.core.groups import Group
from planner.core.perf import PhasePerf
from planner.spec.cluster import Cluster

SCALE = 1_000_000  # capacities in micro-requests/s: networkx's preflow-push wants integers


@dataclass(frozen=True, slots=True)
class Route:
    """KV route from a prefill group to a decode group."""

    transfer_s: float  # one average prompt's KV, end to end
    capacity_rps: float  # requests/s the link sustains (bandwidth-bound, pipelined)


@dataclass(slots=True)
class FlowResult:
    value_rps: float
    explicit_flows: dict[tuple[int, int], float]  # (prefill index, decode index) -> requests/s
    prefill_bound: bool  # the min cut crosses the prefill side (more prefill would help)
    decode_bound: bool
    route_bound: bool  # some route in the min cut
    source_side: set = field(default_factory=set)
    # Fast path: flows are proportional, f_ij = F * (P_i / sum P) * (D_j / sum D), made only when asked for
    # (a search evaluates thousands of states and reads only the value).
    proportional: tuple[list[float], list[float]] | None = None

    @property
    def flows(self) -> dict[tuple[int, int], float]:
        if self.proportional is None:
            return self.explicit_flows
        cap_p, cap_d = self.proportional
        sum_p, sum_d = sum(cap_p), sum(cap_d)
        return {(i, j): self.value_rps * cp / sum_p * cd / sum_d
                for i, cp in enumerate(cap_p) for j, cd in enumerate(cap_d)}


class RouteTable:
    """KV route properties between groups of one cluster, cached by group pair."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.kv_bytes = cm.kv_bytes_per_request(cluster.model, cluster.workload)
        self._cache: dict[tuple, Route] = {}
        self._worst: dict[tuple, float] = {}
        self._min_bw: dict[int, float] = {}
        # The slowest link latency of a one-region fleet (None with several regions: routes between
        # regions always get the pair-by-pair check).
        one_region = len({n.region for n in cluster.nodes}) == 1
        self.max_region_latency = float(cluster.latency.max()) if one_region else None
        # A shared inter-region link carries this many average requests' KV per second.
        self.link_rps = {pair: bw / self.kv_bytes for pair, bw in cluster.region_bandwidth.items()}

    def region(self, group: Group) -> str:
        return self.cluster.nodes[group[0][0]].region

    def _shards(self, group: Group, perf: PhasePerf) -> dict[int, float]:
        """Largest KV share one GPU holds, per node of the group."""
        out: dict[int, float] = {}
        for stage in perf.stages:
            node = group[stage.part][0]
            share = cm.kv_shard_fraction(self.cluster.model, stage.num_layers, stage.tp)
            out[node] = max(out.get(node, 0.0), share)
        return out

    def _region_min_bw(self, node: int) -> float:
        found = self._min_bw.get(node)
        if found is None:
            region = self.cluster.nodes[node].region
            same = [m.index for m in self.cluster.nodes if m.region == region]
            found = float(self.cluster.bandwidth[node, same].min())
            self._min_bw[node] = found
        return found

    def worst_transfer_s(self, group: Group, perf: PhasePerf) -> float:
        """Upper bound on moving this group's KV shards to or from any group of its region (no latency)."""
        key = (group, id(perf))
        found = self._worst.get(key)
        if found is None:
            found = max(share * self.kv_bytes / self._region_min_bw(n) for n, share in self._shards(group, perf).items())
            self._worst[key] = found
        return found

    def route(self, pg: Group, pp: PhasePerf, dg: Group, dp: PhasePerf) -> Route:
        # PhasePerf objects live as long as the evaluator's cache, so their ids are stable keys
        # (hashing their stage tuples on every lookup was the planner's hottest path).
        key = (pg, dg, id(pp), id(dp))
        found = self._cache.get(key)
        if found is not None:
            return found
        bw, lat = self.cluster.bandwidth, self.cluster.latency
        send, recv = self._shards(pg, pp), self._shards(dg, dp)
        # Each GPU moves its shard over its own link; the slowest (shard / link) sets the time.
        t_send = max(share * self.kv_bytes / min(bw[a, b] for b in recv) for a, share in send.items())
        t_recv = max(share * self.kv_bytes / min(bw[a, b] for a in send) for b, share in recv.items())
        latency = max(lat[a, b] for a in send for b in recv)
        busy = max(t_send, t_recv)
        found = Route(transfer_s=busy + latency, capacity_rps=1.0 / busy if busy > 0 else math.inf)
        self._cache[key] = found
        return found


def max_flow(
    prefill: list[tuple[Group, PhasePerf]],
    decode: list[tuple[Group, PhasePerf]],
    routes: RouteTable,
) -> FlowResult:
    """Max flow from prefill groups through KV routes (and shared inter-region links) to decode groups."""
    cap_p = [p.capacity_rps for _, p in prefill]
    cap_d = [d.capacity_rps for _, d in decode]
    sum_p, sum_d = sum(cap_p), sum(cap_d)
    if not prefill or not decode or sum_p <= 0 or sum_d <= 0:
        return FlowResult(0.0, {}, sum_p <= sum_d, sum_d <= sum_p, False)
    if _routes_cannot_bind(prefill, decode, routes):
        return FlowResult(min(sum_p, sum_d), {}, sum_p <= sum_d, sum_d <= sum_p, False, proportional=(cap_p, cap_d))
    region_p = [routes.region(g) for g, _ in prefill]
    region_d = [routes.region(g) for g, _ in decode]
    edges: dict[tuple[int, int], float] = {}
    binding = False
    for i, (pg, pp) in enumerate(prefill):
        for j, (dg, dp) in enumerate(decode):
            r = routes.route(pg, pp, dg, dp)
            if r.transfer_s + dp.latency_s > pp.kv_budget_s:
                binding = True
                continue
            edges[(i, j)] = r.capacity_rps
            if r.capacity_rps < min(cap_p[i], cap_d[j]):
                binding = True
    links: dict[tuple[str, str], float] = {}
    for (i, j) in edges:
        pair = (region_p[i], region_d[j])
        if pair[0] != pair[1] and pair in routes.link_rps:
            links[pair] = routes.link_rps[pair]
    for (a, b), cap in links.items():
        if cap < min(sum(c for c, r in zip(cap_p, region_p) if r == a), sum(c for c, r in zip(cap_d, region_d) if r == b)):
            binding = True
    if not binding:
        value = min(sum_p, sum_d)
        flows = {(i, j): value * cap_p[i] / sum_p * cap_d[j] / sum_d for (i, j) in edges}
        return FlowResult(value, flows, sum_p <= sum_d, sum_d <= sum_p, False)
    shared = {e: (region_p[e[0]], region_d[e[1]]) for e in edges if (region_p[e[0]], region_d[e[1]]) in links}
    return _networkx_flow(cap_p, cap_d, edges, shared, links)


def _routes_cannot_bind(prefill, decode, routes: RouteTable) -> bool:
    """O(groups) proof, for a one-region fleet, that every route exists and none can bind.

    With s_P, r_D upper bounds on a group's KV send/receive time to any group
    of the region: if ``1/s_P >= cap P`` and ``1/r_D >= cap D`` for all groups,
    every route carries ``min(cap P, cap D)``; if ``s_P + latency + max TPOT``
    and ``max(r_D + TPOT_D) + latency`` fit every budget, every route exists.
    Otherwise the caller checks the pairs one by one.
    """
    latency = routes.max_region_latency
    if latency is None:
        return False
    worst_tpot = max(d.latency_s for _, d in decode)
    worst_recv = 0.0
    for g, d in decode:
        r = routes.worst_transfer_s(g, d)
        if r * d.capacity_rps > 1:
            return False
        worst_recv = max(worst_recv, r + d.latency_s)
    for g, p in prefill:
        s = routes.worst_transfer_s(g, p)
        if s * p.capacity_rps > 1 or s + latency + worst_tpot > p.kv_budget_s or worst_recv + latency > p.kv_budget_s:
            return False
    return True


def _networkx_flow(
    cap_p: list[float],
    cap_d: list[float],
    edges: dict[tuple[int, int], float],
    shared: dict[tuple[int, int], tuple[str, str]] | None = None,
    links: dict[tuple[str, str], float] | None = None,
) -> FlowResult:
    """General max flow. Edges in ``shared`` cross an inter-region link whose capacity (``links``) they share.

    A shared link is a vertex pair (in -> out, capacity = link) between the
    prefill groups of one region and the decode groups of the other; its flow
    is split back into per-route flows by a second max flow over the routes
    the link serves, so every reported route respects its own capacity.
    """
    shared = shared or {}
    links = links or {}
    g = nx.DiGraph()
    for i, c in enumerate(cap_p):
        g.add_edge("s", ("P", i), capacity=int(c * SCALE))
    for j, c in enumerate(cap_d):
        g.add_edge(("D", j), "t", capacity=int(c * SCALE))
    for pair, c in links.items():
        g.add_edge(("Lin", pair), ("Lout", pair), capacity=int(c * SCALE))
    for (i, j), c in edges.items():
        c = int(min(c, 1e12) * SCALE)
        if (i, j) in shared:
            pair = shared[(i, j)]
            for u, v in ((("P", i), ("Lin", pair)), (("Lout", pair), ("D", j))):
                old = g.edges[u, v]["capacity"] if g.has_edge(u, v) else 0
                g.add_edge(u, v, capacity=max(old, c))
        else:
            g.add_edge(("P", i), ("D", j), capacity=c)
    value, flow = nx.maximum_flow(g, "s", "t")
    flows = {(i, j): flow[("P", i)][("D", j)] / SCALE for (i, j) in edges
             if (i, j) not in shared and flow[("P", i)][("D", j)] > 0}
    lost = 0.0
    for pair in links:
        sent = {i: flow[("P", i)][("Lin", pair)] for (i, _), p in shared.items() if p == pair}
        got = {j: flow[("Lout", pair)][("D", j)] for (_, j), p in shared.items() if p == pair}
        split = _decompose(sent, got, {e: edges[e] for e, p in shared.items() if p == pair})
        flows.update(split)
        lost += sum(sent.values()) / SCALE - sum(split.values())
    # Min cut: vertices reachable from the source in the residual graph.
    residual_reach = {"s"}
    stack = ["s"]
    while stack:
        u = stack.pop()
        for v, attrs in g[u].items():
            if v not in residual_reach and flow[u][v] < attrs["capacity"]:
                residual_reach.add(v)
                stack.append(v)
        for v in g.predecessors(u):
            if v not in residual_reach and flow[v][u] > 0:
                residual_reach.add(v)
                stack.append(v)
    prefill_bound = any(("P", i) not in residual_reach for i in range(len(cap_p)))
    decode_bound = any(("D", j) in residual_reach for j in range(len(cap_d)))
    route_bound = any(("P", i) in residual_reach and ("D", j) not in residual_reach for (i, j) in edges) or any(
        ("Lin", pair) in residual_reach and ("Lout", pair) not in residual_reach for pair in links)
    return FlowResult(max(value / SCALE - lost, 0.0), flows, prefill_bound, decode_bound, route_bound, residual_reach)


def _decompose(sent: dict[int, int], got: dict[int, int], caps: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """Split a shared link's flow into prefill -> decode route flows (a small bipartite max flow)."""
    g = nx.DiGraph()
    for i, f in sent.items():
        if f > 0:
            g.add_edge("s", ("P", i), capacity=f)
    for j, f in got.items():
        if f > 0:
            g.add_edge(("D", j), "t", capacity=f)
    for (i, j), c in caps.items():
        if sent.get(i, 0) > 0 and got.get(j, 0) > 0:
            g.add_edge(("P", i), ("D", j), capacity=int(min(c, 1e12) * SCALE))
    if "s" not in g or "t" not in g:
        return {}
    _, flow = nx.maximum_flow(g, "s", "t")
    return {(i, j): flow[("P", i)][("D", j)] / SCALE for (i, j) in caps
            if ("P", i) in g and ("D", j) in g and flow[("P", i)].get(("D", j), 0) > 0}
