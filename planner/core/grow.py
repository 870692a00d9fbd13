"""New groups on idle GPUs: the part of re-planning that starts workers.

GPUs of the fleet that no running group holds (GPUs that joined the fleet, or
that the plan left unused) can serve as new groups. A new group needs a
worker started (its model loaded, tens of seconds on a GPU) before it takes
traffic, so the controller charges each one `start_cost` of capacity and
proposes it only when the demand served rises by its `min_gain`
(planner.core.replan).

Per node with idle GPUs, every group size that fits the model and divides the
idle count is tried as copies of one group (the shapes a running node can
host side by side); each new group takes, in turn, the role that raises the
max flow most, next to the running groups in their roles. The best size per
node is kept, nodes one after another, up to `max_new` groups in all.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.roles import Role
from planner.core.groups import Group
from planner.core.refine import Search, State
from planner.spec.cluster import Cluster

ROLES = (Role.PREFILL, Role.DECODE)


@dataclass(frozen=True, slots=True)
class NewGroup:
    group: Group
    role: Role
    gpus: tuple[str, ...]  # GPU names ("node:index") it takes


def idle_gpus(cluster: Cluster, used: set[str]) -> dict[int, list[str]]:
    """Per node index, the names of its GPUs no group holds."""
    idle = {}
    for node in cluster.nodes:
        names = [gpu for gpu in node.gpu_names if gpu not in used]
        if names:
            idle[node.index] = names
    return idle


def _value(search: Search, groups: list[Group], roles: list[Role]) -> float:
    return search.evaluate(State(list(groups), list(roles), {}))[0]


def _with_roles(search: Search, groups: list[Group], roles: list[Role], new: list[Group]) -> tuple[list[Role], float]:
    """Roles for `new` (each in turn, the one giving the most flow), and the flow."""
    chosen: list[Role] = []
    value = _value(search, groups, roles)
    for k, group in enumerate(new):
        trials = []
        for role in ROLES:
            if search.ev.perf(group, role) is None:
                continue
            trials.append((_value(search, groups + new[: k + 1], roles + chosen + [role]), role))
        if not trials:
            return chosen, value
        value, role = max(trials, key=lambda t: t[0])
        chosen.append(role)
    return chosen, value


def propose(search: Search, cluster: Cluster, groups: list[Group], roles: list[Role], used: set[str],
            max_new: int) -> tuple[list[NewGroup], float]:
    """New groups on the idle GPUs (at most `max_new`) and the flow with them; ([], flow now) if none helps."""
    new: list[NewGroup] = []
    value = _value(search, groups, roles)
    for node, names in sorted(idle_gpus(cluster, used).items()):
        room = max_new - len(new)
        if room <= 0:
            break
        best: tuple[float, list[Group], list[Role]] | None = None
        for size in range(1, len(names) + 1):
            copies = min(len(names) // size, room)
            if len(names) % size or not search.ev.evaluate(((node, size),)).feasible:
                continue
            candidate = [((node, size),)] * copies
            chosen, found = _with_roles(search, groups + [n.group for n in new],
                                        roles + [n.role for n in new], candidate)
            if len(chosen) == len(candidate) and (best is None or found > best[0]):
                best = (found, candidate, chosen)
        if best is None or best[0] <= value:
            continue
        value = best[0]
        free = list(names)
        for group, role in zip(best[1], best[2]):
            size = group[0][1]
            new.append(NewGroup(group, role, tuple(free[:size])))
            free = free[size:]
    return new, value
