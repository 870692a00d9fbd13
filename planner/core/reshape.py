"""Moves and restarts: running groups whose GPUs would serve more in another shape.

A role flip keeps a group's GPUs and TP/PP; a new group takes idle GPUs
(planner.core.grow). What neither can do is change the groups themselves:
split a TP-4 prefill group into a TP-2 prefill and a TP-2 decode group when
the workload turned decode-heavy, merge two single-GPU groups of a node into
one TP-2 group when prompts grew, or re-shape one group to the TP degree the
observed workload wants. Each needs the group's worker restarted: the router
starts the new workers first and retires the old one once they serve
(router.plan_changes), so capacity is not lost, but each new worker is
charged `start_cost` of capacity as a new group is.

The candidates are the running groups one at a time (at least two GPUs: a
one-GPU group's only other shape is the other role, a flip) and pairs of
running groups whose GPUs all sit on one node (a merge). For each, its GPUs
are released and offered, with any idle GPUs, to the same proposal that
places new groups (grow.propose); the other running groups keep their
shapes and roles; a released group may come back as it was, at another TP
degree (a TP/PP change), or as other groups. The candidate that serves the
most is returned; the controller acts on it only if it raises the demand
served by `min_gain` after its start costs, and only when no flip or new
group did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

from common.roles import Role
from planner.core import grow
from planner.core.groups import Group
from planner.core.refine import Search
from planner.spec.cluster import Cluster


@dataclass(frozen=True, slots=True)
class Reshape:
    released: tuple[int, ...]  # indices (into the running groups given) of the groups whose workers retire
    new: tuple[grow.NewGroup, ...]  # the groups started on their GPUs (and on idle ones)
    value_rps: float  # the max flow with the change


def candidates(groups: Sequence[Group], sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Which running groups to release together: each of two GPUs or more, and each pair on one node."""
    singles = [(i,) for i, n in enumerate(sizes) if n >= 2]
    one_node = [i for i, g in enumerate(groups) if len(g) == 1]
    pairs = [(i, j) for i, j in combinations(one_node, 2) if groups[i][0][0] == groups[j][0][0]]
    return singles + pairs


def propose(search_for: Callable[[list[int]], Search], cluster: Cluster, groups: list[Group], roles: list[Role],
            gpus: list[list[str]], used: set[str], max_new: int) -> Reshape | None:
    """The best release-and-restart of running `groups` (in `roles`, holding `gpus`), or None.

    search_for(kept): a search whose evaluator holds the running groups at indices `kept` to the shapes
    they run with (released GPUs are free to take any shape). `used`: every GPU a running group holds."""
    best: Reshape | None = None
    sizes = [len(g) for g in gpus]
    for released in candidates(groups, sizes):
        kept = [i for i in range(len(groups)) if i not in released]
        freed = {gpu for i in released for gpu in gpus[i]}
        new, value = grow.propose(search_for(kept), cluster, [groups[i] for i in kept], [roles[i] for i in kept],
                                  used - freed, max(max_new, sum(sizes[i] for i in released)))
        if not new:
            continue
        if best is None or value > best.value_rps:
            best = Reshape(released, tuple(new), value)
    return best

