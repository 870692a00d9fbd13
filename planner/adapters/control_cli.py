"""`python -m planner control`: the re-planning loop against a running router.

    python -m planner control --router http://127.0.0.1:8000 --cluster cluster.json --plan plan.json

Every `--interval-s` it reads the router's `GET /plan` (the live workload
window and each worker's health and group), asks the controller
(`planner.core.replan`) what to do, and applies an "apply" decision with
`POST /plan` (the same path an operator's plan takes; role flips need the
router started with `--flexible-roles`). `--dry-run` posts with
`?dry_run=true`: the router validates the plan and reports the diff, and
nothing changes. One JSON line per decision that acts (every decision with
`--verbose`) goes to stdout. The router's API key comes from `--api-key` or
`$HEXSERVE_API_KEY`. The cluster file is read again whenever it changes:
GPUs listed there later join the fleet, and the controller starts new groups
on them when the observed demand needs them (`--max-new-groups`). When no
flip or new group serves the demand, one running group (or two of one node)
may be restarted in other shapes (split, merged, another TP degree; the
router starts the new workers before it retires the old one;
`--no-restarts` turns this off). While an action's new workers load, the
loop waits for them (at most `--start-timeout-s`).

The loop is an adapter: the decisions are pure and the simulator runs the
same ones on its own clock (planner.sim.elastic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

from common.plan import load_plan
from planner.core.observed import ObservedWorkload
from planner.core.replan import ControlPolicy, Controller, Decision
from planner.spec.cluster import load_cluster
from planner.spec.errors import PlanInputError


class RouterUnreachable(RuntimeError):
    """The router did not answer, or answered with an error; the message says which and why."""


def _router_call(client: httpx.Client, method: str, url: str, **kwargs) -> dict:
    try:
        response = client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise RouterUnreachable(f"{method} {url}: {exc}") from None
    if response.status_code not in (200, 202):  # 202: a plan that starts workers was accepted and is starting
        try:
            message = response.json().get("error", {}).get("message", response.text)
        except ValueError:
            message = response.text
        raise RouterUnreachable(f"{method} {url}: HTTP {response.status_code}: {message}")
    return response.json()


def healthy_groups(view: dict) -> set[str]:
    """Plan groups whose worker the router reports healthy (GET /plan "workers")."""
    return {w["group"] for w in view.get("workers", {}).values() if w.get("healthy") and w.get("group")}


def control_once(client: httpx.Client, router: str, controller: Controller) -> Decision:
    """One look at the router, one decision, acted on (posted, or posted as a dry run)."""
    view = _router_call(client, "GET", f"{router}/plan")
    # The roles the router runs are the truth: an operator (or an earlier run of this loop) may have flipped some.
    controller.adopt_roles({w["group"]: w["role"] for w in view.get("workers", {}).values() if w.get("group")})
    observed = ObservedWorkload.from_summary(view.get("observed"))
    decision = controller.step(observed, healthy_groups(view), time.monotonic())
    if decision.action in ("apply", "dry_run") and decision.plan is not None:
        params = {"dry_run": "true"} if decision.action == "dry_run" else {}
        entry = _router_call(client, "POST", f"{router}/plan", params=params, json=decision.plan.to_json())
        if decision.action == "apply":
            controller.applied(decision)
        print(json.dumps({**decision.to_json(), "router_changes": entry.get("changes", [])}), flush=True)
    return decision


class _FleetFile:
    """The cluster file, re-read when it changes: GPUs listed there later join the fleet."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.mtime_ns = self._mtime()

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def reload_into(self, controller: Controller) -> None:
        mtime = self._mtime()
        if mtime is None or mtime == self.mtime_ns:
            return
        self.mtime_ns = mtime
        try:
            if controller.update_fleet(load_cluster(self.path)):
                print(f"control: {self.path} changed: the fleet now has {controller.cluster.num_gpus} GPUs",
                      file=sys.stderr, flush=True)
        except PlanInputError as exc:  # one line; the fleet stays as it was
            print(f"control: {self.path} not taken: {exc}", file=sys.stderr, flush=True)


def cmd_control(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.cluster)
    try:
        plan = load_plan(args.plan)
    except (OSError, ValueError, KeyError) as exc:
        raise PlanInputError("--plan", f"{args.plan}: {exc}") from None
    try:
        policy = ControlPolicy(interval_s=args.interval_s, min_interval_s=args.min_interval_s,
                               drift_threshold=args.drift_threshold, min_gain=args.min_gain, headroom=args.headroom,
                               max_flips=args.max_flips, max_new_groups=args.max_new_groups,
                               restarts=not args.no_restarts, start_timeout_s=args.start_timeout_s,
                               min_requests=args.min_requests,
                               capacity_threshold=args.capacity_threshold, dry_run=args.dry_run)
    except ValueError as exc:
        raise PlanInputError("control", str(exc)) from None
    controller = Controller(cluster, plan, policy)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    router = args.router.rstrip("/")
    deadline = time.monotonic() + args.duration_s if args.duration_s else None
    fleet = _FleetFile(args.cluster)
    with httpx.Client(headers=headers, timeout=30.0) as client:
        while True:
            fleet.reload_into(controller)
            try:
                decision = control_once(client, router, controller)
                if args.verbose and decision.action == "none":
                    print(json.dumps(decision.to_json()), flush=True)
            except RouterUnreachable as exc:  # one line; the loop goes on (the router may be restarting)
                print(f"control: {exc}", file=sys.stderr, flush=True)
                if args.once:
                    return 1
            if args.once or (deadline is not None and time.monotonic() >= deadline):
                return 0
            time.sleep(policy.interval_s)


def add_control_parser(sub) -> None:
    defaults = ControlPolicy()
    p = sub.add_parser("control", help="re-plan a running router as its workload drifts and its workers come and go")
    p.add_argument("--router", required=True, help="the router's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--cluster", required=True, help="the cluster file the running plan was solved from")
    p.add_argument("--plan", required=True, help="the plan the router runs (plan.json)")
    p.add_argument("--api-key", default=os.environ.get("HEXSERVE_API_KEY"), help="default: $HEXSERVE_API_KEY")
    p.add_argument("--interval-s", type=float, default=defaults.interval_s, help="how often to look")
    p.add_argument("--min-interval-s", type=float, default=defaults.min_interval_s,
                   help="seconds between two actions (a lost or returning worker does not wait)")
    p.add_argument("--drift-threshold", type=float, default=defaults.drift_threshold,
                   help="relative change of rate, mean prompt or mean output that triggers a re-solve")
    p.add_argument("--min-gain", type=float, default=defaults.min_gain,
                   help="share by which an action must raise the demand served (the hysteresis)")
    p.add_argument("--headroom", type=float, default=defaults.headroom, help="capacity wanted above the observed rate")
    p.add_argument("--max-flips", type=int, default=defaults.max_flips, help="role flips per action")
    p.add_argument("--max-new-groups", type=int, default=defaults.max_new_groups,
                   help="new groups started on idle GPUs (joined, or left unused by the plan) per action; 0: never")
    p.add_argument("--no-restarts", action="store_true",
                   help="never restart a running group in another shape (split, merge, TP/PP change)")
    p.add_argument("--start-timeout-s", type=float, default=defaults.start_timeout_s,
                   help="a new group not serving this long after its action is planned around as unhealthy; "
                        "until then no other action is taken")
    p.add_argument("--min-requests", type=int, default=defaults.min_requests,
                   help="finished requests the router's window needs before it is trusted")
    p.add_argument("--capacity-threshold", type=float, default=defaults.capacity_threshold,
                   help="measured median TTFT or TPOT this much slower than predicted triggers a re-solve on "
                        "capacities scaled by the ratio")
    p.add_argument("--dry-run", action="store_true", help="decide and show the router's diff; change nothing")
    p.add_argument("--once", action="store_true", help="one look and one decision, then exit")
    p.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: run until stopped)")
    p.add_argument("--verbose", action="store_true", help="print every decision, not only those that act")
    p.set_defaults(func=cmd_control)
