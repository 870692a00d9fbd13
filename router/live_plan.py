"""The plan the router is serving, changed live: `GET /plan` and `POST /plan`.

`GET /plan` shows the routes and weights in force, the routing policy, each
worker (its role, health, group, and whether its role may flip), the change
in progress (`change`: its state and steps) and the history of changes.
`POST /plan` takes a plan document (the planner's `plan.json`) and applies
the diff from the running workers (router.plan_diff):

- only route weights and role flips (every group a running worker of the
  same shape; a flexible worker, `router serve --flexible-roles`, takes the
  other role without a restart): applied at once (`Cluster.set_plan`), 200.
  The next request uses them; requests in flight finish where they are.
- workers to start or retire (a new group, a group whose TP/PP or role a
  flip cannot change, a running group the plan leaves out): accepted, 202,
  and run in the background (router.plan_changes): the new workers start
  first, the plan's routes follow once they serve, and the retiring ones
  stop after their requests are done. One such change at a time: a POST
  while one runs is answered 409 naming it.

`?dry_run=true` validates and reports what would change (`changes`, `starts`,
`retires`) without changing anything. What no change can serve is refused,
never half-applied: a malformed plan, a plan with no route or a route naming
a group the plan does not have, a route that does not run prefill -> decode
under the new roles, all answered 400 naming the field; the running plan is
then untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from common.plan import GroupPlan, Plan, RoutePlan, plan_from_json
from common.routing import Route
from router.cluster import Cluster
from router.metrics import RouterMetrics
from router.openai_schema import ApiError
from router.plan_changes import PlanChanges, now_iso
from router.plan_diff import PlanDiff, diff_plan
from router.workload_window import WorkloadWindow

HISTORY_LIMIT = 100


@dataclass(slots=True)
class LivePlan:
    cluster: Cluster
    source: str  # where the plan at start came from: a path, or "embedded default"
    window: WorkloadWindow | None = None  # the live workload, shown beside the plan
    changes: PlanChanges | None = None  # None: no launcher, so no worker starts or retires
    metrics: RouterMetrics | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._record("start", self.source, self.cluster.routes)

    def _record(self, action: str, source: str, routes: list[Route], diff: PlanDiff | None = None) -> dict:
        entry = {"at": now_iso(), "action": action, "source": source, "routes": _routes_json(routes),
                 "changes": diff.changes if diff else [],
                 "starts": [s.worker_id for s in diff.starts] if diff else [],
                 "retires": list(diff.retires) if diff else []}
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
                "change": self.changes.in_progress if self.changes is not None else None,
                "observed": self.window.summary() if self.window is not None else None,
                "history": self.history}

    def apply(self, data: Any, dry_run: bool = False) -> dict[str, Any]:
        """The entry of what was (or, dry run, would be) done: action "apply" (at once),
        "change" (workers start or retire in the background: its `state` follows) or "dry_run"."""
        try:
            diff, source = self._diff(data)
        except ApiError:
            if not dry_run:
                self._count("refused")
            raise
        if dry_run:
            return self._record("dry_run", source, diff.routes, diff)
        if not diff.needs_workers:
            self.cluster.set_plan(diff.roles, diff.routes)
            self._count("applied")
            return self._record("apply", source, diff.routes, diff)
        entry = self._record("change", source, diff.routes, diff)
        self.changes.begin(entry, diff)
        return entry

    def _diff(self, data: Any) -> tuple[PlanDiff, str]:
        """The checked diff to the plan in `data`, and where it came from; an ApiError for a
        plan that cannot be served, or while a change is in progress."""
        running = self.changes.in_progress if self.changes is not None else None
        if running is not None:
            raise ApiError(409, f"plan change {running['id']} is in progress ({running['state']}: "
                                f"{'; '.join(running['changes'])}); POST /plan again once GET /plan shows it "
                                "done or failed", code="plan_change_in_progress")
        plan = parse_plan(data)
        settings = self.changes.settings if self.changes is not None else None
        diff = diff_plan(plan, self.cluster.workers, self.cluster.routes, settings)
        try:
            self.cluster.check_plan(diff.roles, diff.routes, adding=diff.starts)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="routes") from None
        if diff.retires and self.changes is None:
            raise ApiError(400, f"the plan leaves out the running worker(s) {diff.retires}, and this router cannot "
                                "retire workers (no launcher); give every running group", param="groups")
        return diff, f"POST /plan ({plan.cluster})"

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.plan_changes.labels(outcome).inc()


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
