"""The plan the router is serving, changed live: `GET /plan` and `POST /plan`.

`GET /plan` shows the routes and weights in force, the routing policy, each
worker (its role, health, group, and whether its role may flip), and the
history of changes. `POST /plan` takes a plan document (the planner's
`plan.json`) whose groups are the running workers and applies it at once:
its route flows become the router's weights, and a group whose role differs
from its worker's flips that worker between prefill and decode, when the
worker is flexible (`router serve --flexible-roles`: started with a kv_both
connector, it needs no restart). Roles and routes change together
(`Cluster.set_plan`); the next request uses them, requests in flight finish
where they are (a flipped worker drains what it took under its old role).
`?dry_run=true` validates and reports what would change without changing
anything; the answer's `changes` lists each flip and each route change.

What this cannot do is refused, never half-applied: a group that is not a
running worker (a new group, a TP/PP change: workers to start or restart), a
flip of a worker that is not flexible, and a flip to or from colocated are
answered 400 naming `groups[i]`; a malformed plan is answered 400 naming the
field. Either way the running plan is untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from common.plan import GroupPlan, Plan, RoutePlan, plan_from_json
from common.roles import Role
from common.routing import Route
from engine.worker_spec import WorkerSpec
from router.cluster import Cluster
from router.deployment import plan_routes
from router.openai_schema import ApiError
from router.workload_window import WorkloadWindow

HISTORY_LIMIT = 100


@dataclass(slots=True)
class LivePlan:
    cluster: Cluster
    source: str  # where the plan at start came from: a path, or "embedded default"
    window: WorkloadWindow | None = None  # the live workload, shown beside the plan
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._record("start", self.source, self.cluster.routes)

    def _record(self, action: str, source: str, routes: list[Route], changes: list[str] | None = None) -> dict:
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action, "source": source,
                 "routes": _routes_json(routes), "changes": changes or []}
        if action != "dry_run":
            self.history.append(entry)
            del self.history[:-HISTORY_LIMIT]
        return entry

    def view(self) -> dict[str, Any]:
        cluster = self.cluster
        return {"routing": cluster.routing, "routes": _routes_json(cluster.routes),
                "workers": {c.worker_id: {"role": c.info.role.value, "healthy": c.healthy, "group": c.info.group_id,
                                          "flexible": c.info.flexible}
                            for c in cluster.clients.values()},
                "observed": self.window.summary() if self.window is not None else None,
                "history": self.history}

    def apply(self, data: Any, dry_run: bool = False) -> dict[str, Any]:
        plan = parse_plan(data)
        worker_of_group, roles, flips = self._running_workers(plan)
        routes = self._routes(plan, worker_of_group)
        try:
            self.cluster.check_plan(roles, routes)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="routes") from None
        changes = flips + _diff(self.cluster.routes, routes)
        if not dry_run:
            self.cluster.set_plan(roles, routes)
        return self._record("dry_run" if dry_run else "apply", f"POST /plan ({plan.cluster})", routes, changes)

    def _running_workers(self, plan: Plan) -> tuple[dict[str, str], dict[str, Role], list[str]]:
        """Each plan group's running worker, the role the plan gives it, and the flips
        (as `changes` lines); an ApiError naming groups[i] for a group that cannot be served."""
        running = {c.info.group_id: c for c in self.cluster.clients.values()}
        worker_of_group, roles, flips = {}, {}, []
        for index, group in enumerate(plan.groups):
            where = f"groups[{index}]"
            try:
                role = Role.parse(group.role, field=f"{where}.role")
            except ValueError as exc:
                raise ApiError(400, str(exc), param=f"{where}.role") from None
            client = running.get(group.id)
            if client is None or not _same_shape(group, client.info):
                raise ApiError(400, f"{where}: group {group.id!r} ({role}, tp={group.tp}, pp={group.pp}) is not "
                                    "a running worker; POST /plan changes the route weights and the roles of the "
                                    "running workers (starting, retiring or reshaping workers is not supported yet)",
                               param=where)
            spec = client.info
            if role is not spec.role:
                refusal = _flip_refusal(spec, role)
                if refusal is not None:
                    raise ApiError(400, f"{where}: group {group.id!r} asks worker {spec.worker_id} to flip from "
                                        f"{spec.role} to {role}, but {refusal}", param=where)
                flips.append(f"flip {spec.worker_id} (group {group.id}): {spec.role} -> {role}")
            worker_of_group[group.id] = spec.worker_id
            roles[spec.worker_id] = role
        return worker_of_group, roles, flips

    @staticmethod
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


def _flip_refusal(spec: WorkerSpec, role: Role) -> str | None:
    """Why the running worker `spec` cannot take `role` without a restart; None if it can."""
    if Role.COLOCATED in (spec.role, role):
        return "only prefill and decode workers flip (a colocated worker runs no KV connector)"
    if not spec.flexible:
        return ("it was started without a kv_both connector; start the router with --flexible-roles "
                "to flip prefill and decode workers without a restart")
    return None


def _same_shape(group: GroupPlan, spec: WorkerSpec) -> bool:
    """A rehearsal runs every group as one CPU worker (tp = pp = 1), whatever the plan says."""
    return (spec.tensor_parallel_size, spec.pipeline_parallel_size) in ((group.tp, group.pp), (1, 1))


def parse_plan(data: Any) -> Plan:
    """The plan document, or an ApiError naming the field that is wrong."""
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a plan document (a JSON object, as `python -m planner solve` writes)")
    unknown = sorted(set(data) - {f.name for f in fields(Plan)} - {"schema", "schema_version"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown field of a plan document", param=unknown[0])
    for name, kind in (("groups", list), ("routes", list)):
        if not isinstance(data.get(name), kind):
            raise ApiError(400, f"{name}: expected a list, got {type(data.get(name)).__name__}", param=name)
    for name, cls in (("groups", GroupPlan), ("routes", RoutePlan)):
        names = {f.name for f in fields(cls)}
        for index, item in enumerate(data[name]):
            where = f"{name}[{index}]"
            if not isinstance(item, dict):
                raise ApiError(400, f"{where}: expected an object", param=where)
            missing = sorted(names - set(item))
            unknown = sorted(set(item) - names)
            if missing or unknown:
                key = (missing or unknown)[0]
                raise ApiError(400, f"{where}.{key}: " + ("missing" if missing else "unknown field"),
                               param=f"{where}.{key}")
    try:
        return plan_from_json(data)
    except KeyError as exc:
        raise ApiError(400, f"the plan lacks field {exc.args[0]!r}", param=str(exc.args[0])) from None
    except (TypeError, ValueError) as exc:
        param = str(exc).split(":", 1)[0] if ":" in str(exc) else None
        raise ApiError(400, f"the plan is malformed: {exc}", param=param) from None


def _routes_json(routes: list[Route]) -> list[dict[str, Any]]:
    return [{"prefill": r.prefill_worker, "decode": r.decode_worker, "weight": r.weight} for r in routes]


def _diff(old: list[Route], new: list[Route]) -> list[str]:
    before = {(r.prefill_worker, r.decode_worker): r.weight for r in old}
    after = {(r.prefill_worker, r.decode_worker): r.weight for r in new}
    changes = [f"+ {p}->{d} weight {w:g}" for (p, d), w in after.items() if (p, d) not in before]
    changes += [f"- {p}->{d}" for (p, d) in before if (p, d) not in after]
    changes += [f"~ {p}->{d} weight {before[(p, d)]:g} -> {w:g}" for (p, d), w in after.items()
                if (p, d) in before and before[(p, d)] != w]
    return changes
