"""Role assignment and iterative refinement of a grouping around the max-flow's min cut.

A state is a list of groups, a role per group, and a pool of GPUs that are in
no group (those that cannot form a feasible one yet). Each iteration reads the
min cut of the current max flow, which says where throughput is bounded:

- prefill-bound: more prefill capacity is needed, so the moves turn decode
  capacity into prefill capacity (flip a decode group, move GPUs from a
  decode group to a prefill group, split a large decode group into one of
  each role, swap GPUs so that compute-strong ones prefill);
- decode-bound: the mirror image;
- route-bound (slow links between regions): flips and swaps on both sides.

Merges and splits inside one role change parallel degrees (a memory-starved
decode replica gains KV room by merging; a large group with a TP/PP it cannot
use well splits into two replicas). A re-split cuts the union of two small
groups every possible way, which reaches mixed groups (two H100s with two
L40Ss in each replica, say) that single-GPU moves reach only through worse
states. Every candidate is screened by an upper
bound (``min(sum prefill, sum decode)`` after the move, which bounds the max
flow) and the most promising ones get a real max-flow; the best improving
move is applied. The search is deterministic for a given seed (the seed only
orders candidates sampled from large neighbourhoods) and stops at a local
optimum or the deadline.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from common.roles import Role
from planner.core.flow import FlowResult, RouteTable, max_flow
from planner.core.groups import Group, group_add, group_size, group_union, sub_compositions
from planner.core.strategy import GroupEvaluator

# The two kinds of plan (plan.json "mode"): prefill and decode groups joined by KV routes, or groups
# that each serve both phases (Role.COLOCATED).
DISAGGREGATED = "disaggregated"
COLOCATED = "colocated"
VERIFY_PER_ITERATION = 6  # after one improving candidate, verify at most this many
MAX_VERIFY = 48  # candidates verified per iteration when none improves
MAX_PARTNERS = 3
MAX_RESPLIT_GPUS = 16  # re-split only unions this small (their sub-multisets are enumerated)
MAX_RESPLIT_PAIRS = 12  # group pairs re-split per iteration (sampled by the seed beyond that)
MAX_RESPLIT_SPLITS = 64  # ... and only when the union has at most this many sub-multisets
OTHER_ROLE = {Role.PREFILL: Role.DECODE, Role.DECODE: Role.PREFILL}  # what a flip turns a group into


@dataclass(slots=True)
class State:
    groups: list[Group]
    roles: list[Role]
    pool: dict[int, int] = field(default_factory=dict)

    def copy(self) -> State:
        return State(list(self.groups), list(self.roles), dict(self.pool))


@dataclass(frozen=True, slots=True)
class Move:
    kind: str
    remove: tuple[int, ...]
    add: tuple[tuple[Group, Role], ...]
    pool_delta: tuple[tuple[int, int], ...] = ()

    def apply(self, state: State) -> State:
        drop = set(self.remove)
        new = State(
            [g for i, g in enumerate(state.groups) if i not in drop],
            [r for i, r in enumerate(state.roles) if i not in drop],
            dict(state.pool),
        )
        for g, r in self.add:
            new.groups.append(g)
            new.roles.append(r)
        for node, k in self.pool_delta:
            new.pool[node] = new.pool.get(node, 0) + k
            if new.pool[node] == 0:
                del new.pool[node]
        return new


@dataclass(frozen=True, slots=True)
class _Neighbourhood:
    """What every kind of move reads about the state it starts from."""

    groups: list[Group]
    roles: list[Role]
    pool: dict[int, int]
    need: set[Role]  # roles the min cut says need capacity
    slack: set[Role]  # roles that can give capacity up
    by_node: dict[int, list[int]]  # node -> indices of the groups with GPUs there
    region_of: list[str]  # per group: the region of its first node


class Search:
    """Local search over groupings for one mode (disaggregated or colocated)."""

    def __init__(self, evaluator: GroupEvaluator, routes: RouteTable, mode: str, seed: int = 0,
                 deadline: float | None = None) -> None:
        self.ev = evaluator
        self.cluster = evaluator.cluster
        self.routes = routes
        self.mode = mode
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.iterations = 0
        self.flow_evaluations = 0
        self.min_bytes = evaluator.min_replica_bytes()

    # -- capacities and values -------------------------------------------------------------------
    def cap(self, group: Group, role: Role) -> float:
        perf = self.ev.perf(group, role)
        return perf.capacity_rps if perf is not None else 0.0

    def can_hold(self, group: Group) -> bool:
        return self.ev.memory_bytes(group) >= self.min_bytes and self.ev.evaluate(group).feasible

    def evaluate(self, state: State) -> tuple[float, FlowResult | None]:
        self.flow_evaluations += 1
        if self.mode == COLOCATED:
            return sum(self.cap(g, Role.COLOCATED) for g in state.groups), None
        prefill = [(g, self.ev.evaluate(g).prefill) for g, r in zip(state.groups, state.roles) if r == Role.PREFILL]
        decode = [(g, self.ev.evaluate(g).decode) for g, r in zip(state.groups, state.roles) if r == Role.DECODE]
        result = max_flow([(g, p) for g, p in prefill if p], [(g, d) for g, d in decode if d], self.routes)
        return result.value_rps, result

    def upper_bound(self, state: State, move: Move, sums: tuple[float, float]) -> float:
        """``min(sum prefill, sum decode)`` after the move (the colocated sum in that mode): bounds the flow."""
        totals = {Role.PREFILL: sums[0], Role.DECODE: sums[1]}
        changes = [(state.groups[i], state.roles[i], -1.0) for i in move.remove] + [(g, r, 1.0) for g, r in move.add]
        for group, role, sign in changes:
            totals[Role.DECODE if role == Role.DECODE else Role.PREFILL] += sign * self.cap(group, role)
        return totals[Role.PREFILL] if self.mode == COLOCATED else min(totals.values())

    def sums(self, state: State) -> tuple[float, float]:
        """(sum of prefill or colocated capacity, sum of decode capacity)."""
        sum_p = sum_d = 0.0
        for g, r in zip(state.groups, state.roles):
            if r == Role.DECODE:
                sum_d += self.cap(g, Role.DECODE)
            else:
                sum_p += self.cap(g, r)
        return sum_p, sum_d

    # -- role assignment -------------------------------------------------------------------------
    def assign_roles(self, groups: list[Group]) -> State:
        """Roles that balance prefill and decode capacity, ignoring routes.

        Sorting groups by prefill/decode capacity ratio and cutting the order
        where ``min(sum prefill, sum decode)`` peaks is optimal for the
        fractional relaxation (the exchange argument of the fractional
        knapsack); the refinement repairs what routes and integrality change.
        """
        feasible = [g for g in groups if self.can_hold(g)]
        pool: dict[int, int] = {}
        for g in groups:
            if g not in feasible:
                for n, c in g:
                    pool[n] = pool.get(n, 0) + c
        if self.mode == COLOCATED:
            return State(feasible, [Role.COLOCATED] * len(feasible), pool)
        caps = [(self.cap(g, Role.PREFILL), self.cap(g, Role.DECODE)) for g in feasible]
        order = sorted(range(len(feasible)), key=lambda i: (-(caps[i][0] / max(caps[i][1], 1e-12)), i))
        total_d = sum(c[1] for c in caps)
        best_k, best_v, acc_p, acc_d = 0, -1.0, 0.0, total_d
        for k in range(len(order) + 1):
            v = min(acc_p, acc_d)
            if v > best_v:
                best_k, best_v = k, v
            if k < len(order):
                acc_p += caps[order[k]][0]
                acc_d -= caps[order[k]][1]
        roles = [Role.DECODE] * len(feasible)
        for i in order[:best_k]:
            roles[i] = Role.PREFILL
        return State(feasible, roles, pool)

    # -- moves -------------------------------------------------------------------------------------
    def _sample(self, items: list, k: int) -> list:
        return items if len(items) <= k else self.rng.sample(items, k)

    def moves(self, state: State, flow: FlowResult | None) -> Iterator[Move]:
        """Every candidate move from ``state``, kind by kind (the order is part of determinism)."""
        hood = self._neighbourhood(state, flow)
        yield from self._flip_moves(hood)
        yield from self._split_moves(hood)
        yield from self._merge_moves(hood)
        yield from self._transfer_moves(hood)
        yield from self._swap_moves(hood)
        yield from self._resplit_moves(hood)
        yield from self._pool_moves(hood)

    def _neighbourhood(self, state: State, flow: FlowResult | None) -> _Neighbourhood:
        """Which roles need capacity and which can give it (from the min cut), and who shares a node."""
        if self.mode == COLOCATED:
            need, slack = {Role.COLOCATED}, {Role.COLOCATED}
        else:
            need, slack = set(), set()
            if flow is None or flow.prefill_bound or flow.route_bound:
                need.add(Role.PREFILL)
                slack.add(Role.DECODE)
            if flow is None or flow.decode_bound or flow.route_bound:
                need.add(Role.DECODE)
                slack.add(Role.PREFILL)
            if not need:
                need, slack = {Role.PREFILL, Role.DECODE}, {Role.PREFILL, Role.DECODE}
        by_node: dict[int, list[int]] = {}
        for i, g in enumerate(state.groups):
            for node, _ in g:
                by_node.setdefault(node, []).append(i)
        region_of = [self.cluster.nodes[g[0][0]].region for g in state.groups]
        return _Neighbourhood(state.groups, state.roles, state.pool, need, slack, by_node, region_of)

    def _flip_moves(self, hood: _Neighbourhood) -> Iterator[Move]:
        """A group that the slack side holds changes to the role that needs capacity."""
        if self.mode == COLOCATED:
            return
        for i, (group, role) in enumerate(zip(hood.groups, hood.roles)):
            if role in hood.slack and OTHER_ROLE[role] in hood.need:
                yield Move("flip", (i,), ((group, OTHER_ROLE[role]),))

    def _split_moves(self, hood: _Neighbourhood) -> Iterator[Move]:
        """A group in two (new degrees; possibly one replica of each role)."""
        for i, group in enumerate(hood.groups):
            for a, b in self._splits(group):
                if not (self.can_hold(a) and self.can_hold(b)):
                    continue
                if self.mode == COLOCATED:
                    yield Move("split", (i,), ((a, Role.COLOCATED), (b, Role.COLOCATED)))
                    continue
                for ra, rb in ((hood.roles[i], hood.roles[i]), (Role.PREFILL, Role.DECODE), (Role.DECODE, Role.PREFILL)):
                    yield Move("split", (i,), ((a, ra), (b, rb)))

    def _merge_moves(self, hood: _Neighbourhood) -> Iterator[Move]:
        """Two groups that share a node or a region in one (a bigger replica: more KV room or lower latency)."""
        groups, roles, n = hood.groups, hood.roles, len(hood.groups)
        for i in range(n):
            near = sorted({j for node, _ in groups[i] for j in hood.by_node[node] if j > i})
            same_role = [j for j in range(i + 1, n) if j not in near and roles[j] == roles[i]
                         and hood.region_of[j] == hood.region_of[i]]
            for j in self._sample(near, MAX_PARTNERS) + self._sample(same_role, MAX_PARTNERS):
                merged = group_union(groups[i], groups[j])
                roles_to_try = {roles[i], roles[j]} if self.mode != COLOCATED else {Role.COLOCATED}
                for r in sorted(roles_to_try):
                    yield Move("merge", (i, j), ((merged, r),))

    def _transfer_moves(self, hood: _Neighbourhood) -> Iterator[Move]:
        """GPUs from a slack-side group to a need-side one (same node first: TP stays on NVLink)."""
        groups, roles = hood.groups, hood.roles
        need_idx = [j for j in range(len(groups)) if roles[j] in hood.need]
        for i in range(len(groups)):
            if roles[i] not in hood.slack:
                continue
            for node, count in groups[i]:
                receivers = [j for j in hood.by_node[node] if j != i and roles[j] in hood.need]
                if not receivers:
                    receivers = [j for j in self._sample(need_idx, 3) if j != i][:2]
                for k in sorted({1, count}):
                    donor = group_add(groups[i], node, -k)
                    if donor and not self.can_hold(donor):
                        continue
                    for j in receivers:
                        grown = group_add(groups[j], node, k)
                        add = ((grown, roles[j]),) + (((donor, roles[i]),) if donor else ())
                        yield Move("move", (i, j), add)

    def _swap_moves(self, hood: _Neighbourhood) -> Iterator[Move]:
        """One GPU each way between a prefill and a decode group of different GPU types."""
        if self.mode == COLOCATED:
            return
        groups, nodes = hood.groups, self.cluster.nodes
        pre = [i for i, r in enumerate(hood.roles) if r == Role.PREFILL]
        dec = [i for i, r in enumerate(hood.roles) if r == Role.DECODE]
        for i in pre:
            for j in self._sample(dec, MAX_PARTNERS):
                for na, _ in groups[i]:
                    for nb, _ in groups[j]:
                        if nodes[na].gpu_type == nodes[nb].gpu_type:
                            continue
                        gi = group_add(group_add(groups[i], na, -1), nb, 1)
                        gj = group_add(group_add(groups[j], nb, -1), na, 1)
                        yield Move("swap", (i, j), ((gi, Role.PREFILL), (gj, Role.DECODE)))

    def _resplit_moves(self, hood: _Neighbourhood) -> Iterator[Move]:
        """Every way to cut the union of two small groups in two.

        This reaches mixed groups (say 2 H100 + 2 L40S per replica) that
        single-GPU moves reach only through worse states.
        """
        groups, roles = hood.groups, hood.roles
        pairs = [(i, j) for i in range(len(groups)) for j in self._partners(hood, i) if j > i
                 and group_size(groups[i]) + group_size(groups[j]) <= MAX_RESPLIT_GPUS
                 and math.prod(c + 1 for _, c in group_union(groups[i], groups[j])) <= MAX_RESPLIT_SPLITS]
        for i, j in self._sample(pairs, MAX_RESPLIT_PAIRS):
            union = group_union(groups[i], groups[j])
            role_pairs = [(Role.COLOCATED, Role.COLOCATED)] if self.mode == COLOCATED else [
                (Role.PREFILL, Role.DECODE), (Role.DECODE, Role.PREFILL), (roles[i], roles[j])]
            for a in sub_compositions(union):
                b = tuple((node, k - dict(a).get(node, 0)) for node, k in union if k - dict(a).get(node, 0) > 0)
                if not b or a > b and self.mode == COLOCATED:
                    continue
                if not (self.can_hold(a) and self.can_hold(b)):
                    continue
                for ra, rb in dict.fromkeys(role_pairs):
                    yield Move("resplit", (i, j), ((a, ra), (b, rb)))

    def _partners(self, hood: _Neighbourhood, i: int) -> list[int]:
        """Groups sharing a node with group i, and a few sampled from its region."""
        near = {j for node, _ in hood.groups[i] for j in hood.by_node[node] if j != i}
        region = [j for j in range(len(hood.groups)) if hood.region_of[j] == hood.region_of[i] and j != i]
        return sorted(near | set(self._sample(region, 3)))

    def _pool_moves(self, hood: _Neighbourhood) -> Iterator[Move]:
        """Pooled GPUs join a group on their node, or form a new group."""
        for node, k in sorted(hood.pool.items()):
            for j in hood.by_node.get(node, []):
                yield Move("pool", (j,), ((group_add(hood.groups[j], node, k), hood.roles[j]),), ((node, -k),))
            fresh: Group = ((node, k),)
            if self.can_hold(fresh):
                for r in (sorted(hood.need) if self.mode != COLOCATED else [Role.COLOCATED]):
                    yield Move("pool", (), ((fresh, r),), ((node, -k),))

    def _splits(self, group: Group) -> list[tuple[Group, Group]]:
        out: list[tuple[Group, Group]] = []
        if len(group) == 1:
            (node, count), = group
            if count >= 2:
                half = count // 2
                out.append((((node, half),), ((node, count - half),)))
        else:
            for cut in range(1, len(group)):
                out.append((group[:cut], group[cut:]))
        return out

    # -- the loop ------------------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def refine(self, state: State, max_iterations: int = 10_000) -> tuple[State, float]:
        value, flow = self.evaluate(state)
        for _ in range(max_iterations):
            if self.out_of_time():
                break
            sums = self.sums(state)
            scored: list[tuple[float, int, Move]] = []
            for idx, move in enumerate(self.moves(state, flow)):
                ub = self.upper_bound(state, move, sums)
                if ub > value * (1 + 1e-9):
                    scored.append((ub, idx, move))
                if idx % 256 == 0 and self.out_of_time():
                    break
            scored.sort(key=lambda t: (-t[0], t[1]))
            best: tuple[float, State, FlowResult | None] | None = None
            verified = 0
            for ub, _, move in scored:
                if best is not None and ub <= best[0]:
                    break  # no later candidate can beat the best verified one
                candidate = move.apply(state)
                v, f = self.evaluate(candidate)
                verified += 1
                if v > value * (1 + 1e-9) and (best is None or v > best[0]):
                    best = (v, candidate, f)
                if verified >= (VERIFY_PER_ITERATION if best is not None else MAX_VERIFY):
                    break
                if self.out_of_time():
                    break
            if best is None:
                break
            value, state, flow = best
            self.iterations += 1
        return state, value
