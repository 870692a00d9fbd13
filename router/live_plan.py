"""The plan the router is serving, changed live: `GET /plan` and `POST /plan`.

`GET /plan` shows the routes and weights in force, the routing policy, each
worker, and the history of changes. `POST /plan` takes a plan document (the
planner's `plan.json`) and applies its route flows to the running workers:
the router's policy is rebuilt with the new weights and the next request
uses them; requests in flight finish where they are. `?dry_run=true`
validates and reports what would change without changing anything.

What this cannot do yet is refused, never half-applied: a plan whose groups
are not the running workers (a new group, a retired one, a TP/PP change or a
role flip needs workers started or restarted) is answered 400 naming the
group, and a malformed plan is answered 400 naming the field; either way the
running plan is untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from common.plan import GroupPlan, Plan, RoutePlan, plan_from_json
from common.roles import Role
from common.routing import Route
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
                "workers": {c.worker_id: {"role": c.info.role.value, "healthy": c.healthy, "group": c.info.group_id}
                            for c in cluster.clients.values()},
                "observed": self.window.summary() if self.window is not None else None,
                "history": self.history}

    def apply(self, data: Any, dry_run: bool = False) -> dict[str, Any]:
        plan = parse_plan(data)
        routes = self._routes_for_running_workers(plan)
        changes = _diff(self.cluster.routes, routes)
        entry = self._record("dry_run" if dry_run else "apply", f"POST /plan ({plan.cluster})", routes, changes)
        if not dry_run:
            self.cluster.set_routes(routes)
        return entry

    def _routes_for_running_workers(self, plan: Plan) -> list[Route]:
        running = {c.info.group_id: c for c in self.cluster.clients.values()}
        worker_of_group = {}
        for index, group in enumerate(plan.groups):
            client = running.get(group.id)
            role = Role.parse(group.role, field=f"groups[{index}].role")
            if client is None or client.info.role is not role or not _same_shape(group, client.info):
                raise ApiError(400, f"groups[{index}]: group {group.id!r} ({role}, tp={group.tp}, pp={group.pp}) is not "
                                    "a running worker; POST /plan changes the route weights among the running workers "
                                    "(starting, retiring or reshaping workers, and role flips, are not supported yet)",
                               param=f"groups[{index}]")
            worker_of_group[group.id] = client.worker_id
        for index, route in enumerate(plan.routes):
            for end in ("prefill", "decode"):
                if getattr(route, end) not in worker_of_group:
                    raise ApiError(400, f"routes[{index}].{end}: group {getattr(route, end)!r} is not in the plan's groups",
                                   param=f"routes[{index}].{end}")
        routes = plan_routes(plan, worker_of_group)
        if not routes:
            raise ApiError(400, "the plan has no route with positive flow; re-solve it", param="routes")
        return routes


def _same_shape(group: GroupPlan, spec) -> bool:
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
