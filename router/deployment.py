"""What to run: the workers and routes of a deployment, from a plan or the embedded default.

Pure: builds specs, starts nothing. A plan group becomes one worker (one vLLM
engine replica with the group's TP/PP) of the group's role: `python -m
prefill`, `python -m decode`, or, for a colocated group, `python -m engine`
(no KV connector); a plan route becomes a routing entry with the plan's weight.
With `flexible_roles` every prefill and decode worker starts with a kv_both
connector (`WorkerSpec.flexible`), so that `POST /plan` may flip it between
the two roles without a restart; colocated workers never do. `group_worker`
is the one place a group becomes a worker: at start, and when a live plan
change starts a new or reshaped group (router.plan_changes), with the
`WorkerSettings` the deployment keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.roles import Role
from common.routing import Route
from engine.worker_spec import WorkerSpec
from router.launch_local import local_worker_endpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a plan group becomes a worker: what every worker of one router shares.
    Kept by the router, so that a live plan change starts new groups exactly as the
    plan at start did (`group_worker`)."""

    model_path: str
    served_model_name: str
    max_model_len: int = 1024
    kv_connector: str = "zmq"
    host: str = "127.0.0.1"
    worker_link: str = "ipc"
    cpu_kvcache_gib: int = 1
    block_size: int | None = None
    flexible_roles: bool = False  # prefill and decode workers run a kv_both connector (their roles may flip)
    rehearsal: bool = False  # the tiny model stands in for the plan's: every group one CPU worker (tp = pp = 1)


@dataclass(slots=True)
class Deployment:
    workers: list[WorkerSpec]
    routes: list[Route]
    model_path: str
    served_model_name: str
    max_model_len: int
    # Ray placement: worker id -> {"nodes": [...], "gpu_types": {type: count}, "num_gpus": n}
    placement: dict[str, dict] | None = None
    settings: WorkerSettings | None = None  # how further groups become workers (a live plan change)

def _resolve_model(model: str | None, served_model_name: str | None) -> tuple[str, str]:
    if model is None:
        from engine.tiny_model import TINY_MODEL_NAME, build_tiny_model

        return str(build_tiny_model()), served_model_name or TINY_MODEL_NAME
    return model, served_model_name or model


def embedded_default(model: str | None = None, served_model_name: str | None = None, max_model_len: int = 1024,
                     kv_connector: str = "zmq", host: str = "127.0.0.1", worker_link: str = "ipc",
                     block_size: int | None = None, flexible_roles: bool = False) -> Deployment:
    """One prefill and one decode worker on this machine, one route.

    worker_link: how the router and the workers reach each other (control and
    KV endpoints), "ipc" (Unix sockets) or "tcp" on `host`. flexible_roles:
    both run a kv_both connector, so their roles may flip (POST /plan)."""
    model_path, served = _resolve_model(model, served_model_name)
    shared = dict(model=model_path, served_model_name=served, max_model_len=max_model_len, kv_connector=kv_connector,
                  block_size=block_size, flexible=flexible_roles)
    workers = [
        # (A prefill worker binds its kv_endpoint only when flexible: else it receives no KV, see prefill.worker.)
        WorkerSpec(worker_id=worker_id, role=role, control_endpoint=local_worker_endpoint(worker_id, "control", worker_link, host),
                   kv_endpoint=local_worker_endpoint(worker_id, "kv", worker_link, host),
                   kv_events_endpoint=local_worker_endpoint(worker_id, "events", worker_link, host),
                   group_id=group, **shared)
        for worker_id, role, group in (("prefill-0", Role.PREFILL, "p0"), ("decode-0", Role.DECODE, "d0"))
    ]
    settings = WorkerSettings(model_path=model_path, served_model_name=served, max_model_len=max_model_len,
                              kv_connector=kv_connector, host=host, worker_link=worker_link, block_size=block_size,
                              flexible_roles=flexible_roles, rehearsal=model is None)
    return Deployment(workers=workers, routes=[Route("prefill-0", "decode-0", 1.0)], model_path=model_path,
                      served_model_name=served, max_model_len=max_model_len, settings=settings)


def worker_id_of(group, role: Role) -> str:
    """A group's worker is named by its role and group id: `decode-d1`."""
    return f"{role}-{group.id}"


def group_worker(group, settings: WorkerSettings, worker_id: str | None = None) -> tuple[WorkerSpec, dict]:
    """One plan group's worker spec and its Ray placement ({"nodes", "gpu_types", "num_gpus"}).

    The one place a group becomes a worker: at start (deployment_from_plan) and
    when a live plan change starts a new or reshaped group (router.plan_diff),
    which names it `worker_id` (default `worker_id_of`)."""
    role = Role.parse(group.role, field=f"plan group {group.id} role")
    worker_id = worker_id or worker_id_of(group, role)
    tp, pp = (1, 1) if settings.rehearsal else (group.tp, group.pp)
    moves_kv = role is not Role.COLOCATED
    link, host = settings.worker_link, settings.host
    spec = WorkerSpec(
        worker_id=worker_id, role=role,
        # One KV socket per engine rank. On Ray each actor re-binds both on its node's address (tcp).
        control_endpoint=local_worker_endpoint(worker_id, "control", link, host),
        kv_endpoint=local_worker_endpoint(worker_id, "kv", link, host, ranks=tp * pp) if moves_kv else None,
        kv_events_endpoint=local_worker_endpoint(worker_id, "events", link, host),
        kv_connector=settings.kv_connector if moves_kv else "none", flexible=settings.flexible_roles and moves_kv,
        tensor_parallel_size=tp, pipeline_parallel_size=pp,
        layer_partition=tuple(group.layer_partition) if pp > 1 else (),
        group_id=group.id, model=settings.model_path, served_model_name=settings.served_model_name,
        max_model_len=settings.max_model_len, cpu_kvcache_gib=settings.cpu_kvcache_gib,
        block_size=settings.block_size)
    placement = {"nodes": list(group.nodes), "gpu_types": dict(group.gpu_types), "num_gpus": len(group.gpus)}
    if tp * pp > 1:  # where each stage runs: a group with stages on several nodes is one engine across them (router.host_span)
        placement["stages"] = [{"node": stage.node, "gpu_type": stage.gpu_type, "gpus": len(stage.gpus),
                                "ranks": stage.tp} for stage in group.stages]
    return spec, placement


def deployment_from_plan(plan, model: str | None = None, served_model_name: str | None = None,
                         max_model_len: int = 1024, kv_connector: str = "zmq", host: str = "127.0.0.1",
                         cpu_kvcache_gib: int = 1, worker_link: str = "ipc", block_size: int | None = None,
                         flexible_roles: bool = False) -> Deployment:
    """One worker per plan group (`group_worker`); routes weighted by the plan's max-flow.

    A route's weight is its flow (`rate_rps`, requests/s the plan sends along
    it), so the router splits traffic the way the max-flow does. `model`
    overrides the plan's model: a plan made for Llama-2-70B can be rehearsed
    on a CPU machine with the tiny model (then TP/PP are 1, as a CPU worker
    cannot split); a plan made for the tiny model (a lab's) keeps its TP/PP.
    Colocated groups serve both phases and route to themselves.
    flexible_roles: prefill and decode workers run a kv_both connector, so
    their roles may flip (POST /plan); colocated workers are never flexible.
    """
    model_path, served = _resolve_model(model, served_model_name)
    settings = WorkerSettings(model_path=model_path, served_model_name=served, max_model_len=max_model_len,
                              kv_connector=kv_connector, host=host, worker_link=worker_link,
                              cpu_kvcache_gib=cpu_kvcache_gib, block_size=block_size,
                              flexible_roles=flexible_roles, rehearsal=model is None and not plans_tiny_model(plan))
    if not settings.rehearsal and kv_connector != "none":
        check_kv_layouts(plan)
    workers: list[WorkerSpec] = []
    placement: dict[str, dict] = {}
    worker_of_group: dict[str, str] = {}
    for group in plan.groups:
        spec, where = group_worker(group, settings)
        workers.append(spec)
        placement[spec.worker_id] = where
        worker_of_group[group.id] = spec.worker_id
    routes = plan_routes(plan, worker_of_group)
    if not routes:
        raise ValueError("the plan has no route with positive flow; re-solve it (is any group able to serve?)")
    return Deployment(workers=workers, routes=routes, model_path=model_path, served_model_name=served,
                      max_model_len=max_model_len, placement=placement, settings=settings)


def plans_tiny_model(plan) -> bool:
    """A plan made for the tiny model itself (a lab's): served as planned, TP and PP
    included, not rehearsed with every group on one CPU worker."""
    from engine.tiny_model import TINY_MODEL_NAME

    return (plan.model or {}).get("name") == TINY_MODEL_NAME


def plan_routes(plan, worker_of_group: dict[str, str]) -> list[Route]:
    """The plan's prefill->decode routes by their flow, and each serving colocated group to itself."""
    routes = []
    for r in plan.routes:
        flow = r.rate_rps if r.rate_rps > 0 else r.weight
        if flow > 0:
            routes.append(Route(worker_of_group[r.prefill], worker_of_group[r.decode], flow))
    for group in plan.groups:
        if group.role == Role.COLOCATED and group.capacity_rps > 0:
            worker_id = worker_of_group[group.id]
            routes.append(Route(worker_id, worker_id, group.load_rps or group.capacity_rps))
    return routes


def check_kv_layouts(plan) -> None:
    """Warn, before anything starts, about routes whose KV cannot be resharded.

    Each rank of a prefill group (pipeline stage x TP rank) sends its KV
    heads of its layers to the decode ranks that hold them: any pipeline
    splits work on either side, and TP sizes work when one divides the other
    (kvtransfer/reshard.py). Any other TP pair still serves (decode
    refuses the mismatched KV and recomputes the prompt) but loses the point
    of disaggregation: warn.
    """
    tp_of = {g.id: g.tp for g in plan.groups}
    for route in plan.routes:
        prefill_tp, decode_tp = tp_of.get(route.prefill, 1), tp_of.get(route.decode, 1)
        if route.prefill != route.decode and decode_tp % prefill_tp and prefill_tp % decode_tp:
            logger.warning(
                "route %s (tp=%s) -> %s (tp=%s): neither TP divides the other, so the KV cannot be "
                "resharded and decode will recompute these prompts",
                route.prefill, prefill_tp, route.decode, decode_tp,
            )
