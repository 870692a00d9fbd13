"""Re-planning a running disaggregated cluster: the decide half of the control loop.

The router watches (its sliding window of the live workload, its workers'
health); something drives this loop (`python -m planner control` against a
router, or the simulator's clock, planner.sim.elastic) and acts on what it
decides (`POST /plan`, or the simulation's routes and roles). The decision is
the same code in both places:

    every interval: observed workload + healthy groups
      -> a worker was lost or came back?                 re-plan now
      -> else: within min_interval_s of the last action?  wait
               fewer than min_requests observed?          wait
               drift from the workload the plan was made for below drift_threshold, and the
               measured median TTFT/TPOT within capacity_threshold of predicted?  nothing to do
      -> warm-started re-solve: the running groups and roles, on the healthy
         groups, at the observed workload, each role's capacity scaled down
         where the measured latencies say the model is optimistic
         (planner.core.running); the best role flip, then the best
         next one, up to max_flips (each charged flip_cost of capacity)
      -> act only if the capacity the plan can serve of the demand
         (observed rate x (1 + headroom)) rises by min_gain: a plan that
         already serves its demand is left alone, and a workload sitting at
         a break-even point flips nothing back and forth (the hysteresis)
      -> the new plan: the same group ids and GPU names, new roles, route
         weights from the max flow at the observed workload

Role flips between prefill and decode (workers started with a kv_both
connector) and route weights change a running cluster without a restart.
Every group is evaluated with the TP degree (and so the pipeline depth) it
runs with, in either role (`planner.core.running`). An unhealthy group stays
in the plan without routes (a plan that leaves a running group out retires
its worker). GPUs no group holds (they joined the fleet: `update_fleet`, or
the plan left them unused) can become new groups (planner.core.grow), each
charged `start_cost` of capacity for the worker it starts: proposed only when
the observed demand needs them. When neither a flip nor a new group helps,
one running group (or two of one node) may be restarted in other shapes:
split, merged, or at another TP degree (planner.core.reshape), each new
worker charged `start_cost`; the router starts them before it retires the
old worker.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from common.plan import Plan
from common.roles import Role
from planner.core import grow, reshape
from planner.core.decision import ControlPolicy, Decision, change_text, partial_decision
from planner.core.flow import RouteTable
from planner.core.groups import Group
from planner.core.observed import ObservedWorkload, drift
from planner.core.plan_builder import build_plan
from planner.core.refine import DISAGGREGATED, OTHER_ROLE, Search, State
from planner.core.running import CapacityScale, RunningShapes, measured_scale
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster
from planner.spec.errors import PlanInputError
from planner.spec.workload import Workload

DECISIONS_KEPT = 200
__all__ = ["ControlPolicy", "Controller", "Decision"]


@dataclass(slots=True)
class _Group:
    id: str
    group: Group
    gpus: list[str]
    role: Role
    shape: tuple[int, int]  # (tp, pp) it runs with


def _groups_of_plan(cluster: Cluster, plan: Plan) -> list[_Group]:
    if plan.mode != DISAGGREGATED:
        raise PlanInputError("mode", f"re-planning flips prefill and decode roles; a {plan.mode} plan has none")
    node_index = {n.name: n.index for n in cluster.nodes}
    out = []
    for k, g in enumerate(plan.groups):
        counts: dict[int, int] = {}
        for gpu in g.gpus:
            node = gpu.rpartition(":")[0]
            if node not in node_index:
                raise PlanInputError(f"groups[{k}].gpus", f"node {node!r} is not in cluster {cluster.name!r}; "
                                     "give the cluster file the plan was solved from")
            counts[node_index[node]] = counts.get(node_index[node], 0) + 1
        out.append(_Group(g.id, tuple(sorted(counts.items())), list(g.gpus), Role.parse(g.role, f"groups[{k}].role"),
                          (g.tp, g.pp)))
    return out


@dataclass(slots=True)
class Controller:
    """The running plan, what it was made for, and the decisions so far."""

    cluster: Cluster  # the fleet; its workload is what the plan was solved for
    plan: Plan
    policy: ControlPolicy = field(default_factory=ControlPolicy)
    decisions: list[Decision] = field(default_factory=list)
    flips_total: int = 0
    _groups: list[_Group] = field(default_factory=list)
    _reference: Workload | None = None
    _healthy: frozenset[str] = frozenset()
    _last_action_s: float | None = None
    _fleet_changed: bool = False  # GPUs joined or left since the last re-plan
    _starting: dict[str, float] = field(default_factory=dict)  # new group id -> when its action was applied

    def __post_init__(self) -> None:
        self._groups = _groups_of_plan(self.cluster, self.plan)
        self._reference = self.cluster.workload
        self._healthy = frozenset(g.id for g in self._groups)

    @property
    def roles(self) -> dict[str, Role]:
        return {g.id: g.role for g in self._groups}

    def step(self, observed: ObservedWorkload | None, healthy: set[str] | frozenset[str] | None,
             now_s: float) -> Decision:
        """What to do now; `healthy`: ids of the groups whose workers are up (None: all)."""
        known = frozenset(g.id for g in self._groups)
        healthy = known if healthy is None else frozenset(healthy) & known  # a retiring worker is not ours
        self._starting = {gid: at for gid, at in self._starting.items()
                          if gid not in healthy and now_s - at < self.policy.start_timeout_s}
        if self._starting:  # one change at a time: the last one's workers are still loading
            decision = partial_decision(now_s, observed, healthy)(
                f"waiting for new groups {sorted(self._starting)} to serve")
        else:
            decision = self._decide(observed, healthy, now_s)
        self.decisions.append(decision)
        del self.decisions[:-DECISIONS_KEPT]
        return decision

    def adopt_roles(self, running: dict[str, str]) -> list[str]:
        """The roles the cluster runs (group id -> role), where they differ from this controller's view
        (an operator's `POST /plan`, or another controller): the next decision starts from them."""
        changed = []
        for g in self._groups:
            role = running.get(g.id)
            if role is not None and Role.parse(role) is not g.role:
                changed.append(f"{g.id}: {g.role} -> {role}")
                g.role = Role.parse(role)
        if changed:
            roles = {g.id: str(g.role) for g in self._groups}
            self.plan = dataclasses.replace(self.plan, groups=[dataclasses.replace(p, role=roles.get(p.id, p.role))
                                                               for p in self.plan.groups])
        return changed

    def update_fleet(self, cluster: Cluster) -> bool:
        """The fleet as its cluster file now lists it (GPUs joined or left); True if its GPUs changed.

        Every GPU a running group holds must still be listed: a node that left takes its
        groups' workers with it, which the router reports as unhealthy instead."""
        if cluster.model != self.cluster.model:
            raise PlanInputError("model", f"the cluster file now serves {cluster.model.name}, the running plan "
                                 f"{self.cluster.model.name}; re-plan with `planner solve` and restart the router")
        listed = set(cluster.gpu_names)
        for g in self._groups:
            missing = [gpu for gpu in g.gpus if gpu not in listed]
            if missing:
                raise PlanInputError("fleet.nodes", f"GPU {missing[0]} of running group {g.id} is not in the "
                                     "cluster file any more; keep its node listed while the group runs")
        changed = listed != set(self.cluster.gpu_names)
        self.cluster = dataclasses.replace(cluster, workload=self.cluster.workload)
        self._groups = _groups_of_plan(self.cluster, self.plan)  # node indices of the new file
        self._fleet_changed = self._fleet_changed or changed
        return changed

    def applied(self, decision: Decision) -> None:
        """The driver acted on `decision`: it is now the running plan."""
        if decision.action != "apply" or decision.plan is None:
            raise ValueError("only an 'apply' decision with a plan can be applied")
        self._groups = _groups_of_plan(self.cluster, decision.plan)  # the plan's roles; new groups join
        self.plan = decision.plan
        started = {gid for gid, _, _ in decision.new_groups}
        self._healthy = frozenset(decision.healthy & {g.id for g in self._groups}) | started
        self._starting.update({gid: decision.at_s for gid in started})
        if decision.observed is not None and decision.observed.requests >= self.policy.min_requests:
            self._reference = decision.observed.as_workload(self.cluster.workload)
        self._last_action_s = decision.at_s
        self.flips_total += len(decision.flips)

    def _decide(self, observed: ObservedWorkload | None, healthy: frozenset[str], now_s: float) -> Decision:
        policy = self.policy
        quiet = partial_decision(now_s, observed, healthy)
        health_changed = healthy != self._healthy or self._fleet_changed  # either: look now
        trusted = observed is not None and observed.requests >= policy.min_requests
        if not health_changed:
            if self._last_action_s is not None and now_s - self._last_action_s < policy.min_interval_s:
                return quiet(f"within {policy.min_interval_s:g} s of the last action")
            if not trusted:
                return quiet(f"{observed.requests if observed else 0} requests observed, fewer than "
                             f"{policy.min_requests}")
        workload = observed.as_workload(self.cluster.workload) if trusted else self._reference
        cluster = dataclasses.replace(self.cluster, workload=workload)
        scale = self._measured_scale(cluster, observed if trusted else None, healthy)
        if not health_changed:
            moved = drift(observed, self._reference)
            if moved < policy.drift_threshold and scale.worst >= 1 / (1 + policy.capacity_threshold):
                return quiet(f"workload drift {moved:.0%} below {policy.drift_threshold:.0%}, measured latencies "
                             f"within {policy.capacity_threshold:.0%} of predicted", scale=scale)
        return self._replan(cluster, observed if trusted else None, healthy, now_s, scale)

    def _evaluator(self, cluster: Cluster, scale: CapacityScale = CapacityScale(),
                   running: list[_Group] | None = None) -> RunningShapes:
        """Each of the `running` groups (default: all) held to its TP degree; other GPUs free."""
        running = self._groups if running is None else running
        return RunningShapes(cluster, {g.group: g.shape[0] for g in running}, scale)

    def _measured_scale(self, cluster: Cluster, observed: ObservedWorkload | None,
                        healthy: frozenset[str]) -> CapacityScale:
        """How much of each role's modelled capacity the router's measured latencies support."""
        if observed is None or (observed.ttft_ms_p50 is None and observed.tpot_ms_p50 is None):
            return CapacityScale()
        live = [g for g in self._groups if g.id in healthy]
        if not any(g.role is Role.PREFILL for g in live) or not any(g.role is Role.DECODE for g in live):
            return CapacityScale()
        state = State([g.group for g in live], [g.role for g in live], {})
        running = build_plan(cluster, self._evaluator(cluster), RouteTable(cluster), state, DISAGGREGATED, {})
        return measured_scale(running.predicted, observed)

    def _replan(self, cluster: Cluster, observed: ObservedWorkload | None, healthy: frozenset[str], now_s: float,
                scale: CapacityScale) -> Decision:
        policy = self.policy
        evaluator, routes = self._evaluator(cluster, scale), RouteTable(cluster)
        search = Search(evaluator, routes, DISAGGREGATED)
        live = [g for g in self._groups if g.id in healthy]
        roles = [g.role for g in live]
        before = _value(search, live, roles)
        demand = observed.rate_rps * (1 + policy.headroom) if observed is not None else math.inf
        flips, best = self._flips(search, evaluator, live, roles, before, demand)
        new, best = self._grow(search, cluster, live, roles, demand, before, best, len(flips))
        retired: tuple[int, ...] = ()
        if best < demand:  # flips and new groups leave demand unserved: would restarts serve more?
            running_roles = [g.role for g in live]
            retired, reshaped, value = self._reshape(cluster, scale, live, running_roles, demand, before, best)
            if retired:  # instead of the flips and new groups, not with them: one kind of change per action
                flips, new, roles, best = [], reshaped, running_roles, value
        fleet_changed, self._fleet_changed = self._fleet_changed, False
        base = partial_decision(now_s, observed, healthy)
        # A fleet that only grew changes nothing by itself: its new GPUs serve once they are needed.
        if not flips and not new and healthy == self._healthy:
            why = "; the fleet's new GPUs are not needed at the observed demand" if fleet_changed else ""
            return base(f"no role flip, new group or restart raises the demand served by {policy.min_gain:.0%} "
                        f"({before:.2f} req/s at the observed workload){why}", before_rps=before, after_rps=before,
                        scale=scale)
        kept = [g for i, g in enumerate(live) if i not in retired]
        kept_roles = [r for i, r in enumerate(roles) if i not in retired]
        state = State([g.group for g in kept] + [n.group for n in new], kept_roles + [n.role for n in new], {})
        new_ids = _new_ids(self._groups, len(new))
        names = [(g.id, g.gpus) for g in kept] + [(i, list(n.gpus)) for i, n in zip(new_ids, new)]
        plan = build_plan(cluster, evaluator if not retired else self._evaluator(cluster, scale, kept), routes, state,
                          DISAGGREGATED, {"name": "replan", "warm_start": True}, names=names)
        flipped = tuple((live[i].id, str(live[i].role), str(roles[i])) for i in flips)
        started = tuple((i, str(n.role), len(n.gpus)) for i, n in zip(new_ids, new))
        left_out = tuple(sorted(g.id for g in self._groups if g.id not in healthy))
        self._keep_unrouted(plan, left_out)
        self._keep_running_shapes(plan)
        reason = "; ".join(filter(None, [
            f"workers of groups {list(left_out)} are unhealthy" if left_out else "",
            "the fleet's GPUs changed" if fleet_changed else "",
            "every worker is healthy again" if healthy != self._healthy and not left_out else "",
            change_text(flipped, started, [live[i].id for i in retired], before, best)]))
        if scale.worst < 1.0:
            reason += f"; capacities scaled by the measured latencies {scale.to_json()}"
        return Decision(now_s, "dry_run" if policy.dry_run else "apply", reason, flips=flipped, left_out=left_out,
                        new_groups=started, retired=tuple(live[i].id for i in retired), before_rps=before,
                        after_rps=best, observed=observed, plan=plan, healthy=healthy, scale=scale)

    def _flips(self, search: Search, evaluator: GroupEvaluator, live: list[_Group], roles: list[Role],
               before: float, demand: float) -> tuple[list[int], float]:
        """Role flips, best first, up to max_flips, each net of its flip cost (`roles` updated in place):
        (indices into `live` flipped, the capacity with them)."""
        policy = self.policy
        flips: list[int] = []
        best = before
        for _ in range(policy.max_flips):
            found = _best_flip(search, evaluator, live, roles, flips)
            if found is None:
                break
            index, value = found
            if value <= best or not self._pays(value, policy.flip_cost * (len(flips) + 1), before, best, demand):
                break
            flips.append(index)
            roles[index] = OTHER_ROLE[roles[index]]
            best = value
        return flips, best

    def _reshape(self, cluster: Cluster, scale: CapacityScale, live: list[_Group], roles: list[Role],
                 demand: float, before: float, best: float) -> tuple[tuple[int, ...], list, float]:
        """Running groups restarted in other shapes when the observed demand needs it, net of start costs:
        (indices into `live` retired, new groups, the capacity with them)."""
        policy = self.policy
        if math.isinf(demand) or not policy.restarts:  # no trusted observation: no demand asks for workers
            return (), [], best
        used = {gpu for g in self._groups for gpu in g.gpus}
        routes = RouteTable(cluster)
        found = reshape.propose(
            lambda kept: Search(self._evaluator(cluster, scale, [live[i] for i in kept]), routes, DISAGGREGATED),
            cluster, [g.group for g in live], roles, [g.gpus for g in live], used, policy.max_new_groups)
        if found is None:
            return (), [], best
        if not self._pays(found.value_rps, policy.start_cost * len(found.new), before, best, demand):
            return (), [], best
        return found.released, list(found.new), found.value_rps

    def _grow(self, search: Search, cluster: Cluster, live: list[_Group], roles: list[Role],
              demand: float, before: float, best: float, num_flips: int) -> tuple[list, float]:
        """New groups on idle GPUs when the observed demand needs them, net of their start cost."""
        policy = self.policy
        if math.isinf(demand) or policy.max_new_groups == 0:  # no trusted observation: no demand asks for workers
            return [], best
        used = {gpu for g in self._groups for gpu in g.gpus}
        new, value = grow.propose(search, cluster, [g.group for g in live], roles, used, policy.max_new_groups)
        if not new or not self._pays(value, policy.flip_cost * num_flips + policy.start_cost * len(new), before,
                                     best, demand):
            return [], best
        return new, value

    def _pays(self, value: float, charged_share: float, before: float, best: float, demand: float) -> bool:
        """Whether an action pays: the demand it serves at capacity `value`, less its charges (`charged_share`
        of today's capacity `before`), beats what is served without it (`best`) by min_gain (the hysteresis)."""
        return min(value, demand) - before * charged_share >= min(best, demand) * (1 + self.policy.min_gain)

    def _keep_running_shapes(self, plan: Plan) -> None:
        """Each group as it runs: its TP/PP, layer split and stages (a running engine keeps them; the
        router would restart a worker whose plan group changed them). The predictions stay those of the
        split chosen per role, slightly optimistic for a flipped pipelined group."""
        running = {g.id: g for g in self.plan.groups}
        for k, group in enumerate(plan.groups):
            was = running.get(group.id)
            if was is not None:
                plan.groups[k] = dataclasses.replace(group, tp=was.tp, pp=was.pp,
                                                     layer_partition=list(was.layer_partition),
                                                     stages=list(was.stages))

    def _keep_unrouted(self, plan: Plan, group_ids: tuple[str, ...]) -> None:
        """An unhealthy group stays in the plan, with no route and no load: a plan that leaves a
        running group out retires its worker, and this one may come back (its GPUs stay unlisted as unused)."""
        for group in self.plan.groups:
            if group.id in group_ids:
                plan.groups.append(dataclasses.replace(group, load_rps=0.0))
                plan.unused_gpus = [g for g in plan.unused_gpus if g not in group.gpus]


def _new_ids(groups: list[_Group], count: int) -> list[str]:
    """Ids for new groups, after the plan's own (g0, g1, ...)."""
    taken = {g.id for g in groups}
    ids, k = [], len(groups)
    while len(ids) < count:
        if f"g{k}" not in taken:
            ids.append(f"g{k}")
        k += 1
    return ids


def _value(search: Search, groups: list[_Group], roles: list[Role]) -> float:
    value, _ = search.evaluate(State([g.group for g in groups], list(roles), {}))
    return value


def _best_flip(search: Search, evaluator: GroupEvaluator, groups: list[_Group], roles: list[Role],
               done: list[int]) -> tuple[int, float] | None:
    """The one flip (not yet made, keeping the group's TP/PP) that gives the most capacity."""
    best: tuple[int, float] | None = None
    for i, g in enumerate(groups):
        if i in done or roles[i] not in OTHER_ROLE:
            continue
        if evaluator.perf(g.group, OTHER_ROLE[roles[i]]) is None:  # cannot serve it with its shape
            continue
        trial = list(roles)
        trial[i] = OTHER_ROLE[roles[i]]
        value = _value(search, groups, trial)
        if best is None or value > best[1]:
            best = (i, value)
    return best
