"""What a plan document asks of the running workers: the diff `POST /plan` applies.

Each plan group is matched to a running worker by group id:

    running, same shape, same role        kept (its routes' weights may change)
    running, same shape, the other role   flipped (a flexible worker: no restart)
    running, a change a flip cannot do    reshaped: a new worker `<role>-<group>-r<n>` starts,
      (TP, PP or layer split; a role        the old one retires once the new one serves
      change of a worker without a
      kv_both connector, to or from
      colocated)
    not running                           started: `<role>-<group>`, as at start
    running, but not in the plan          retired

New workers are specs built exactly as at start (`router.deployment.group_worker`,
with the router's `WorkerSettings`). Pure: nothing starts or changes here;
router.plan_changes runs a diff that starts or retires workers, Cluster.set_plan
one that only flips and re-weights. What no diff can serve is an ApiError naming
the field: a malformed role or a repeated group (`groups[i]`), a route end that
is not a plan group (`routes[i].prefill|decode`), a plan with no route
(`routes`); and `check_roles_and_routes` (Cluster.check_plan) refuses routes
that do not run prefill -> decode under the new roles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from common.plan import GroupPlan, Plan
from common.roles import Role
from common.routing import Route
from engine.worker_spec import WorkerSpec
from router.deployment import WorkerSettings, group_worker, plan_routes, worker_id_of
from router.openai_schema import ApiError

_REVISION = re.compile(r"-r(\d+)$")


@dataclass(slots=True)
class PlanDiff:
    roles: dict[str, Role]  # each kept worker's role under the plan (a flip where it differs)
    routes: list[Route]  # the plan's routes by worker id, new workers included
    starts: list[WorkerSpec] = field(default_factory=list)  # new and reshaped groups' workers
    placement: dict[str, dict] = field(default_factory=dict)  # their Ray placement, by worker id
    retires: list[str] = field(default_factory=list)  # left-out groups' and reshaped groups' old workers
    changes: list[str] = field(default_factory=list)  # one line per start, restart, flip, retire, route change

    @property
    def needs_workers(self) -> bool:
        """Workers start or retire: a background change (router.plan_changes), not an instant one."""
        return bool(self.starts or self.retires)


def flip_refusal(spec: WorkerSpec, role: Role) -> str | None:
    """Why the running worker `spec` cannot take `role` without a restart; None if it can."""
    if Role.COLOCATED in (spec.role, role):
        return "only prefill and decode workers flip (a colocated worker runs no KV connector)"
    if not spec.flexible:
        return ("it was started without a kv_both connector; start the router with --flexible-roles "
                "to flip prefill and decode workers without a restart")
    return None


def diff_plan(plan: Plan, running: list[WorkerSpec], routes_in_force: list[Route],
              settings: WorkerSettings | None) -> PlanDiff:
    """The diff from the running workers and their routes to `plan`. settings None: this router
    cannot start workers, so a group that needs one is refused naming `groups[i]`."""
    by_group = {spec.group_id: spec for spec in running}
    taken = {spec.worker_id for spec in running}
    diff, worker_of_group = PlanDiff(roles={}, routes=[]), {}
    for index, group in enumerate(plan.groups):
        where = f"groups[{index}]"
        try:
            role = Role.parse(group.role, field=f"{where}.role")
        except ValueError as exc:
            raise ApiError(400, str(exc), param=f"{where}.role") from None
        if group.id in worker_of_group:
            raise ApiError(400, f"{where}: group id {group.id!r} appears twice in the plan", param=where)
        worker_of_group[group.id] = _diff_group(diff, where, group, role, by_group.get(group.id), settings, taken)
    kept = set(worker_of_group.values())
    for spec in running:
        if spec.worker_id not in kept and spec.worker_id not in diff.retires:
            diff.retires.append(spec.worker_id)
            diff.changes.append(f"retire {spec.worker_id} (group {spec.group_id}): not in the plan")
    diff.routes = _routes(plan, worker_of_group)
    diff.changes += _route_changes(routes_in_force, diff.routes)
    return diff


def _diff_group(diff: PlanDiff, where: str, group: GroupPlan, role: Role, spec: WorkerSpec | None,
                settings: WorkerSettings | None, taken: set[str]) -> str:
    """Add one group's part to `diff`; the id of the worker that serves the group under the plan."""
    reason = None
    if spec is not None:
        reshape = _shape_change(group, spec, settings)
        refusal = flip_refusal(spec, role) if role is not spec.role else None
        if reshape is None and refusal is None:
            if role is not spec.role:
                diff.changes.append(f"flip {spec.worker_id} (group {group.id}): {spec.role} -> {role}")
            diff.roles[spec.worker_id] = role
            return spec.worker_id
        if settings is None and reshape is None:
            raise ApiError(400, f"{where}: group {group.id!r} asks worker {spec.worker_id} to flip from {spec.role} "
                                f"to {role}, but {refusal}", param=where)
        if reshape is None:
            reason = f"{spec.role} -> {role} needs a restart: {refusal}"
        else:
            reason = reshape + (f", {spec.role} -> {role}" if role is not spec.role else "")
    if settings is None:
        raise ApiError(400, f"{where}: group {group.id!r} ({role}, tp={group.tp}, pp={group.pp}) is not a running "
                            "worker, and this router cannot start workers (no launcher): POST /plan changes the "
                            "routes and roles of its running workers", param=where)
    worker_id = _new_worker_id(group, role, spec, taken)
    new, placement = group_worker(group, settings, worker_id)
    taken.add(worker_id)
    diff.starts.append(new)
    diff.placement[worker_id] = placement
    if spec is None:
        diff.changes.append(f"start {worker_id} (group {group.id}): {role}, {_shape(new)}")
    else:
        diff.retires.append(spec.worker_id)
        diff.changes.append(f"restart {spec.worker_id} (group {group.id}) as {worker_id}: {reason}")
    return worker_id


def _shape_change(group: GroupPlan, spec: WorkerSpec, settings: WorkerSettings | None) -> str | None:
    """How the group's worker would differ in shape (TP, PP, layer split) from the running `spec`
    ("tp=1, pp=1 -> tp=2, pp=1"): only a new worker can take it. None: the same shape."""
    if settings is not None:
        wanted = _shape(group_worker(group, settings, spec.worker_id)[0])
        return None if wanted == _shape(spec) else f"{_shape(spec)} -> {wanted}"
    # Without settings, a rehearsal's one CPU worker (tp = pp = 1) serves any group.
    if (spec.tensor_parallel_size, spec.pipeline_parallel_size) in ((group.tp, group.pp), (1, 1)):
        return None
    return f"{_shape(spec)} -> tp={group.tp}, pp={group.pp}"


def _shape(spec: WorkerSpec) -> str:
    text = f"tp={spec.tensor_parallel_size}, pp={spec.pipeline_parallel_size}"
    return text + (f", layers {list(spec.layer_partition)}" if spec.pipeline_parallel_size > 1 else "")


def _new_worker_id(group: GroupPlan, role: Role, replaces: WorkerSpec | None, taken: set[str]) -> str:
    """`<role>-<group>` for a new group; a reshaped group's next revision, `<role>-<group>-r<n>`;
    never a worker id in use."""
    base = worker_id_of(group, role)
    if replaces is None and base not in taken:
        return base
    match = _REVISION.search(replaces.worker_id) if replaces is not None else None
    revision = int(match.group(1)) + 1 if match else 1
    while f"{base}-r{revision}" in taken:
        revision += 1
    return f"{base}-r{revision}"


def _routes(plan: Plan, worker_of_group: dict[str, str]) -> list[Route]:
    for index, route in enumerate(plan.routes):
        for end in ("prefill", "decode"):
            if getattr(route, end) not in worker_of_group:
                raise ApiError(400, f"routes[{index}].{end}: group {getattr(route, end)!r} is not in the plan's groups",
                               param=f"routes[{index}].{end}")
    routes = plan_routes(plan, worker_of_group)
    if not routes:
        raise ApiError(400, "the plan has no route with positive flow; re-solve it", param="routes")
    return routes


def check_roles_and_routes(specs: dict[str, WorkerSpec], roles: dict[str, Role], routes: list[Route]) -> dict[str, Role]:
    """The flips `roles` (worker id -> role) asks of the workers `specs`, the whole change checked
    first: every worker known; a flip only between prefill and decode, and only of a flexible
    worker (kv_both connector); every route between known workers, from a prefill to a decode
    worker or from a colocated worker to itself, under the new roles. A ValueError names the
    first problem (Cluster.check_plan)."""
    flips: dict[str, Role] = {}
    for worker_id, wanted in roles.items():
        spec = specs.get(worker_id)
        if spec is None:
            raise ValueError(f"unknown worker {worker_id!r}; the running workers are {sorted(specs)}")
        role = Role.parse(wanted, field=f"worker {worker_id} role")
        if role is spec.role:
            continue
        refusal = flip_refusal(spec, role)
        if refusal is not None:
            raise ValueError(f"worker {worker_id} cannot flip from {spec.role} to {role}: {refusal}")
        flips[worker_id] = role
    role_of = {worker_id: flips.get(worker_id, spec.role) for worker_id, spec in specs.items()}
    for route in routes:
        p, d = route.prefill_worker, route.decode_worker
        for worker_id in (p, d):
            if worker_id not in specs:
                raise ValueError(f"route {p}->{d} names unknown worker {worker_id!r}")
        expected = (Role.COLOCATED, Role.COLOCATED) if p == d else (Role.PREFILL, Role.DECODE)
        if (role_of[p], role_of[d]) != expected:
            raise ValueError(f"route {p}->{d} runs from a {role_of[p]} worker to a {role_of[d]} worker; a route "
                             "goes from a prefill worker to a decode worker, or a colocated worker to itself")
    return flips


def _route_changes(old: list[Route], new: list[Route]) -> list[str]:
    before = {(r.prefill_worker, r.decode_worker): r.weight for r in old}
    after = {(r.prefill_worker, r.decode_worker): r.weight for r in new}
    changes = [f"+ {p}->{d} weight {w:g}" for (p, d), w in after.items() if (p, d) not in before]
    changes += [f"- {p}->{d}" for (p, d) in before if (p, d) not in after]
    changes += [f"~ {p}->{d} weight {before[(p, d)]:g} -> {w:g}" for (p, d), w in after.items()
                if (p, d) in before and before[(p, d)] != w]
    return changes
