"""Plan changes that start or retire workers, run in the background: start before retire.

    POST /plan, a diff with workers to start or retire (router.plan_diff)
      ──▶ 202 and the change's entry at once (what starts, what retires, the route changes)
    starting   the new workers are launched (the router's launcher: local processes or Ray
               actors), joined to the cluster (Cluster.add_worker: client, KV-events feed,
               health checks) and awaited until each answers, at most ready_timeout_s
                 └─ one exits or times out: every new worker is let go and stopped, the
                    running plan is untouched; state "failed"
    routes     the plan's roles and routes together (Cluster.set_plan): the next request
               may go to the new workers, none goes to a retiring one
    draining   until no request needs a retiring worker (Cluster.in_use: a route through it
               picked and not finished, or a request in flight on it), at most drain_timeout_s
    retiring   each is let go (Cluster.remove_worker: client closed, feed cancelled, prefix
               index entries dropped; its /metrics series go with it) and stopped for good
               (launcher.retire_workers: the supervisor never restarts it)
    done

One change at a time: the entry is the one in GET /plan's history, and its
`state` and `steps` grow as it goes; each step is also one log line (logger
router.plan_changes, kept at INFO by `python -m router`). /metrics counts the
workers started and retired (`hexserve_workers_started_total`,
`hexserve_workers_retired_total`) and the changes by outcome
(`hexserve_plan_changes_total`). A reshaped group's old worker retires only
after its new one serves: a TP/PP change never leaves the group without a
worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from router.cluster import Cluster
from router.deployment import WorkerSettings
from router.metrics import RouterMetrics
from router.plan_diff import PlanDiff
from router.worker_client import WorkerUnavailable

log = logging.getLogger(__name__)

IN_PROGRESS = ("starting", "draining")  # the states of a change not yet done or failed


class _Failed(Exception):
    """A step of the change failed; the message says which and why."""


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class PlanChanges:
    """Runs the changes that start or retire workers, one at a time, with the router's launcher."""

    cluster: Cluster
    launcher: Any  # router.launch_local.LocalLauncher or router.launch_ray.RayLauncher
    settings: WorkerSettings  # how a new group becomes a worker (router.deployment.group_worker)
    metrics: RouterMetrics | None = None
    ready_timeout_s: float = 900.0
    drain_timeout_s: float = 600.0
    poll_interval_s: float = 0.1
    current: dict | None = None  # the entry of the change in progress (or the last one)
    _task: asyncio.Task | None = None
    _count: int = 0

    @property
    def in_progress(self) -> dict | None:
        """The entry of the change still running, if one is."""
        return self.current if self.current is not None and self.current["state"] in IN_PROGRESS else None

    def begin(self, entry: dict[str, Any], diff: PlanDiff) -> None:
        """Run `diff` in the background; `entry` (a history entry) shows its state and steps."""
        assert self.in_progress is None, "one plan change at a time (POST /plan answers 409)"
        self._count += 1
        entry.update(id=self._count, state="starting" if diff.starts else "draining", steps=[])
        self.current = entry
        self._step(entry, "accepted", "; ".join(diff.changes))
        self._task = asyncio.ensure_future(self._run(entry, diff))

    async def close(self) -> None:
        """The router is stopping: a change in progress stops where it is (the launcher
        stops every worker it started next)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait(self) -> None:
        """Until the change in progress (if any) is done or failed."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self, entry: dict, diff: PlanDiff) -> None:
        try:
            await self._start(entry, diff)
            try:
                self._apply_routes(entry, diff)
            except _Failed:
                await self._let_go([spec.worker_id for spec in diff.starts])
                raise
            await self._drain(entry, diff.retires)
            await self._retire(entry, diff.retires)
        except _Failed as exc:
            self._finish(entry, "failed", str(exc))
            return
        except asyncio.CancelledError:
            self._finish(entry, "failed", f"the router stopped during the change ({entry['steps'][-1]['step']})")
            raise
        except Exception as exc:  # noqa: BLE001 - a launcher or cluster error: recorded, logged with its traceback
            log.exception("plan change %s failed", entry["id"])
            self._finish(entry, "failed", f"{entry['steps'][-1]['step']}: {type(exc).__name__}: {exc}")
            return
        self._finish(entry, "done", "; ".join(filter(None, [
            f"started {', '.join(s.worker_id for s in diff.starts)}" if diff.starts else "",
            f"retired {', '.join(diff.retires)}" if diff.retires else ""])))

    async def _start(self, entry: dict, diff: PlanDiff) -> None:
        """Launch, join and await the new workers; on any failure let every one of them go."""
        if not diff.starts:
            return
        ids = [spec.worker_id for spec in diff.starts]
        self._step(entry, "start", f"starting {', '.join(ids)}")
        started_at = time.monotonic()
        try:
            specs = await asyncio.to_thread(self.launcher.add_workers, diff.starts, diff.placement)
        except Exception as exc:  # noqa: BLE001 - the launcher's reason, in the history and the log
            raise _Failed(f"could not start {', '.join(ids)}: {exc}") from None
        alive = self.launcher.alive_checks()
        clients = [self.cluster.add_worker(spec, alive.get(spec.worker_id)) for spec in specs]
        try:
            await self._all_healthy(entry, clients, started_at)
        except WorkerUnavailable as exc:
            await self._let_go(ids)
            where = ", ".join(self.launcher.log_location(w) for w in ids)
            raise _Failed(f"{exc}; the new workers were stopped and the running plan is unchanged "
                          f"(read {where})") from None
        if self.metrics is not None:
            self.metrics.workers_started.inc(len(ids))

    async def _all_healthy(self, entry: dict, clients: list, started_at: float) -> None:
        """Until every client's worker answers (a step each); the first that exits or times out raises."""
        async def healthy(client) -> None:
            await client.wait_healthy(self.ready_timeout_s)
            self._step(entry, "healthy", f"{client.worker_id} after {time.monotonic() - started_at:.1f} s")

        waits = [asyncio.ensure_future(healthy(client)) for client in clients]
        try:
            await asyncio.gather(*waits)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _let_go(self, worker_ids: list[str]) -> None:
        """Remove workers no route names from the cluster, then stop them for good."""
        for worker_id in worker_ids:
            await self.cluster.remove_worker(worker_id)
        await asyncio.to_thread(self.launcher.retire_workers, worker_ids)

    def _apply_routes(self, entry: dict, diff: PlanDiff) -> None:
        self.cluster.retiring.update(diff.retires)
        try:
            self.cluster.set_plan(diff.roles, diff.routes)
        except ValueError as exc:  # checked when the change was accepted; nothing else changes the plan meanwhile
            self.cluster.retiring.difference_update(diff.retires)
            raise _Failed(f"the plan's routes were refused: {exc}") from None
        routes = ", ".join(f"{r.prefill_worker}->{r.decode_worker}" for r in diff.routes)
        self._step(entry, "routes", f"in force: {routes}" + (f"; no route to {', '.join(diff.retires)}"
                                                            if diff.retires else ""))

    async def _drain(self, entry: dict, retires: list[str]) -> None:
        if not retires:
            return
        entry["state"] = "draining"
        busy = [w for w in retires if self.cluster.in_use(w)]
        self._step(entry, "drain", f"waiting for the requests on {', '.join(busy)}" if busy else "nothing in flight")
        deadline = time.monotonic() + self.drain_timeout_s
        while busy := [w for w in retires if self.cluster.in_use(w)]:
            if time.monotonic() > deadline:
                self._step(entry, "drain", f"{', '.join(busy)} still busy after {self.drain_timeout_s:.0f} s: "
                                           "retired anyway (their requests fail over)", level=logging.WARNING)
                return
            await asyncio.sleep(self.poll_interval_s)

    async def _retire(self, entry: dict, retires: list[str]) -> None:
        if not retires:
            return
        self._step(entry, "retire", f"no request needs {', '.join(retires)}: stopping it for good")
        await self._let_go(retires)
        if self.metrics is not None:
            self.metrics.workers_retired.inc(len(retires))
        self._step(entry, "retired", ", ".join(retires))

    def _finish(self, entry: dict, state: str, detail: str) -> None:
        entry["state"] = state
        if detail:
            entry["error"] = detail
        self._step(entry, state, detail, level=logging.INFO if state == "done" else logging.WARNING)
        if self.metrics is not None:
            self.metrics.plan_changes.labels(state).inc()

    @staticmethod
    def _step(entry: dict, step: str, detail: str, level: int = logging.INFO) -> None:
        entry["steps"].append({"at": now_iso(), "step": step, "detail": detail})
        log.log(level, "plan change %s: %s: %s", entry["id"], step, detail)
