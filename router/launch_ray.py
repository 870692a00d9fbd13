"""Placing workers on a Ray cluster: one actor per plan group, pinned by placement group.

GPU types are Ray custom resources: each node advertises what it holds, e.g.
`ray start --resources '{"gpu_type:H100": 8}'` (or `ray.init(resources=...)`
for a local cluster). A group that the plan gives 2 H100 + 2 A6000 asks for a
placement group of one bundle per GPU type with `STRICT_PACK` when the plan
keeps the group on one node, `PACK` otherwise; Ray finds the nodes. On real
GPU nodes each bundle also asks for `GPU`, so Ray sets CUDA_VISIBLE_DEVICES.

The actor does not run vLLM itself: it starts the same `python -m prefill|decode`
process a local deployment uses, on its node, bound to the node's address.
vLLM manages its own engine processes, which it does more reliably as a plain
process than nested inside an actor, and the router talks to every worker the
same way (ZeroMQ control endpoint), wherever it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from common.cpu_cgroup import make_cgroup, remove_cgroup
from common.emulated_device import EmulatedDevices, emulated_devices_from_env
from common.ports import free_tcp_port
from common.ray_resources import NODE_RESOURCE_SHARE, gpu_type_resource, named_nodes, node_resource
from engine.config import CPU_DEFAULT_BLOCK_SIZE
from engine.worker_spec import WorkerSpec
from router.deployment import Deployment
from router.host_span import HostShare, host_bundles, host_network_env, host_shares, shared_fields
from router.launch_local import LocalLauncher, local_endpoint, release_endpoint_ports

log = logging.getLogger(__name__)

def placement_bundles(placement: dict, use_gpus: bool,
                      named_nodes: frozenset[str] = frozenset()) -> tuple[list[dict[str, float]], str]:
    """Bundles and strategy for one group: a bundle per GPU type, packed onto one node if the plan did,
    and onto the plan's node itself when the cluster names its nodes (`named_nodes`)."""
    nodes = placement.get("nodes", [])
    pinned = nodes[0] if len(nodes) == 1 and nodes[0] in named_nodes else None
    bundles = []
    for gpu_type, count in sorted(placement.get("gpu_types", {}).items()):
        bundle = {gpu_type_resource(gpu_type): float(count), "CPU": 1.0}
        if use_gpus:
            bundle["GPU"] = float(count)
        if pinned is not None:
            bundle[node_resource(pinned)] = NODE_RESOURCE_SHARE
        bundles.append(bundle)
    if not bundles:
        bundles = [{"CPU": 1.0}]
    strategy = "STRICT_PACK" if len(placement.get("nodes", [])) <= 1 else "PACK"
    return bundles, strategy


def on_node(spec: WorkerSpec, node_ip: str, ranks: int | None = None) -> WorkerSpec:
    """The spec bound on the actor's node: every endpoint the worker listens on
    (control, KV with one port per rank, events) moves to a free TCP port of the
    node's address. Any worker with a KV endpoint gets it back rebound: a decode
    worker, and a flexible prefill worker (its kv_both connector listens too);
    the rest of the spec, --flexible-role included, travels unchanged. `ranks`:
    the engine's ranks on this node, when it spans hosts (router.host_span)."""
    return dataclasses.replace(
        spec,
        control_endpoint=local_endpoint(node_ip),
        kv_endpoint=local_endpoint(node_ip, ranks or spec.num_ranks) if spec.kv_endpoint else None,
        kv_events_endpoint=local_endpoint(node_ip) if spec.kv_events_endpoint else None,
    )


def on_emulated_devices(spec: WorkerSpec, devices: EmulatedDevices | None, num_devices: int) -> WorkerSpec:
    """The spec for a node whose devices are emulated: the worker runs in a cgroup of its
    own, its model's process in a child of it with its devices' CPU time
    (common.emulated_device), and it gets their KV blocks. Unchanged on a node with real devices."""
    if devices is None:
        return spec
    if num_devices > devices.num_devices:
        raise RuntimeError(f"worker {spec.worker_id} needs {num_devices} devices; this node emulates "
                           f"{devices.num_devices} of type {devices.gpu_type}")
    cgroup = make_cgroup(devices.worker_cgroup(spec.worker_id))
    make_cgroup(devices.device_cgroup(spec.worker_id), devices.quota(num_devices))
    return dataclasses.replace(spec, cpu_cgroup=str(cgroup), kv_cache_blocks=devices.kv_cache_blocks(
        num_devices, spec.block_size or CPU_DEFAULT_BLOCK_SIZE),
        env=spec.env + devices.engine_env(num_devices, spec.worker_id))


class _WorkerActor:
    """Runs one worker process on the actor's node and reports where it listens.
    With `host_ranks` it runs one host's share of an engine that spans hosts
    (router.host_span): it binds that host's endpoints and waits for `launch`."""

    def __init__(self, spec: WorkerSpec, num_devices: int = 1, host_ranks: int | None = None):
        import ray

        self.node_ip = ray.util.get_node_ip_address()
        self.spec = on_node(spec, self.node_ip, host_ranks)
        self.spec = on_emulated_devices(self.spec, emulated_devices_from_env(), num_devices)
        gpu_ids = ray.get_gpu_ids()
        if gpu_ids:
            self.spec = dataclasses.replace(
                self.spec, env=self.spec.env + (("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in gpu_ids)),))
        self.launcher = LocalLauncher()
        self.stopped = False
        if host_ranks is None:
            self.launcher.start(self.spec)

    def spec_(self) -> WorkerSpec:
        return self.spec

    def free_port(self) -> int:
        """A free port on this node (where an engine's hosts meet, on host 0)."""
        return free_tcp_port(self.node_ip)

    def launch(self, node_rank: int, shared: dict) -> WorkerSpec:
        """Start this host's share of an engine that spans hosts, with what its hosts
        share (every rank's KV endpoint, where they meet: host_span.shared_fields)."""
        self.spec = dataclasses.replace(self.spec, node_rank=node_rank, env=self.spec.env + host_network_env(self.node_ip),
                                        **shared)
        self.launcher.start(self.spec)
        return self.spec

    def relaunch(self) -> bool:
        """Start this host's share again (one of its engine's hosts died: all start again)."""
        if self.stopped:
            return False
        if self.alive():
            self.launcher.kill(self.spec.worker_id)
        self.launcher.restart(self.spec)
        return True

    def alive(self) -> bool:
        return self.launcher.is_alive(self.spec.worker_id)

    def restart_if_dead(self) -> bool:
        if self.stopped or self.alive():  # a stopped (retired) worker is never started again
            return False
        self.launcher.restart(self.spec)
        return True

    def stop(self) -> None:
        self.stopped = True
        self.launcher.stop()
        if self.spec.cpu_cgroup is not None:
            remove_cgroup(Path(self.spec.cpu_cgroup))


def _actor_in(group, bundle_index: int, bundle: dict[str, float], name: str, *args):
    """A worker actor, named `name`, in bundle `bundle_index` of placement group `group`."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, num_gpus=bundle.get("GPU", 0), max_restarts=0)(_WorkerActor)
    return actor_cls.options(
        name=name,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group,
                                                             placement_group_bundle_index=bundle_index),
    ).remote(*args)


class ActorLiveness:
    """Each worker actor's answer to `alive()`, asked without blocking: a check reads the
    answer to the last question if it has come, and asks again. Until the first answer a
    worker counts as alive; an actor that is gone answers with an error: dead."""

    def __init__(self) -> None:
        self._asked: dict[str, object] = {}  # worker id -> the ObjectRef of the question in flight
        self._alive: dict[str, bool] = {}

    def check(self, worker_id: str, actor) -> bool:
        import ray

        asked = self._asked.pop(worker_id, None)
        if asked is not None:
            ready, _ = ray.wait([asked], timeout=0)
            if not ready:
                self._asked[worker_id] = asked
            else:
                try:
                    self._alive[worker_id] = bool(ray.get(asked))
                except ray.exceptions.RayError:
                    self._alive[worker_id] = False
        if worker_id not in self._asked and actor is not None:
            self._asked[worker_id] = actor.alive.remote()
        return self._alive.get(worker_id, True)


@dataclass
class RayLauncher:
    """Starts each worker as a Ray actor; same interface as LocalLauncher. Where a
    worker goes is `deployment.placement[worker_id]` (the group's nodes and GPU
    types); `add_workers` adds the placements of the workers it starts."""

    address: str
    deployment: Deployment
    use_gpus: bool = False
    actors: dict[str, object] = field(default_factory=dict)
    placement_groups: dict[str, object] = field(default_factory=dict)
    # An engine that spans hosts: the actors of its hosts 1.. (host 0's is in `actors`).
    host_actors: dict[str, list] = field(default_factory=dict)
    specs: dict[str, WorkerSpec] = field(default_factory=dict)
    _owns_ray: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)  # restart_dead against retire_workers
    _liveness: ActorLiveness = field(default_factory=ActorLiveness)

    def __post_init__(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=None if self.address == "local" else self.address, ignore_reinit_error=True,
                     log_to_driver=False)
            self._owns_ray = True

    def logs_note(self) -> str:
        # log_to_driver=False above: the actors' output stays in Ray's session logs.
        return "worker logs in Ray's session logs on each node (`ray logs`)"

    def log_location(self, worker_id: str) -> str:
        return f"the Ray logs of actor hexserve-{worker_id} (`ray logs actor --help`)"

    def start(self, spec: WorkerSpec, timeout_s: float = 300.0) -> WorkerSpec:
        import ray

        placement = (self.deployment.placement or {}).get(spec.worker_id, {})
        shares = host_shares(spec.worker_id, placement, spec.num_ranks)
        if shares is not None:
            return self._start_across_hosts(spec, shares, timeout_s)
        bundles, strategy = placement_bundles(placement, self.use_gpus, named_nodes(ray.cluster_resources()))
        group = self._place(spec.worker_id, bundles, strategy, timeout_s)
        actor = _actor_in(group, 0, bundles[0], f"hexserve-{spec.worker_id}", spec,
                          max(1, int(placement.get("num_gpus", 1))))
        with self._lock:  # known before it answers: a start that fails is stopped with the rest
            self.actors[spec.worker_id] = actor
            self.placement_groups[spec.worker_id] = group
        actual = ray.get(actor.spec_.remote(), timeout=timeout_s)
        self.specs[spec.worker_id] = actual
        release_endpoint_ports(spec)  # the actor bound the worker anew on its node (on_node)
        return actual

    def _place(self, worker_id: str, bundles: list[dict[str, float]], strategy: str, timeout_s: float):
        import ray
        from ray.util.placement_group import placement_group

        group = placement_group(bundles, strategy=strategy, name=f"hexserve-{worker_id}")
        try:
            ray.get(group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise RuntimeError(
                f"Ray could not place worker {worker_id}: no node offers {bundles} ({strategy}). "
                f"Start nodes with e.g. `ray start --resources '{{\"{gpu_type_resource('H100')}\": 8}}'`."
            ) from None
        return group

    def _start_across_hosts(self, spec: WorkerSpec, shares: list[HostShare], timeout_s: float) -> WorkerSpec:
        """One engine over several hosts (router.host_span): an actor per host, each bound on
        its node; once every host's endpoints are known, each starts its share, host 0 the
        engine the router talks to, the others its headless ranks."""
        import ray

        bundles = host_bundles(shares, self.use_gpus, named_nodes(ray.cluster_resources()))
        group = self._place(spec.worker_id, bundles, "STRICT_SPREAD", timeout_s)
        names = [f"hexserve-{spec.worker_id}" + (f"-host{index}" if index else "") for index in range(len(shares))]
        actors = [_actor_in(group, index, bundles[index], names[index], spec, share.devices, share.ranks)
                  for index, share in enumerate(shares)]
        with self._lock:
            self.actors[spec.worker_id] = actors[0]
            self.host_actors[spec.worker_id] = actors[1:]
            self.placement_groups[spec.worker_id] = group
        bound = ray.get([actor.spec_.remote() for actor in actors], timeout=timeout_s)
        shared = shared_fields(bound, ray.get(actors[0].free_port.remote(), timeout=timeout_s))
        started = ray.get([actor.launch.remote(rank, shared) for rank, actor in enumerate(actors)], timeout=timeout_s)
        self.specs[spec.worker_id] = started[0]
        release_endpoint_ports(spec)
        log.info("worker %s: one engine on %d hosts (%s)", spec.worker_id, len(shares),
                 ", ".join(f"{share.node}: {share.ranks} ranks" for share in shares))
        return started[0]

    def add_workers(self, specs: list[WorkerSpec], placement: dict[str, dict] | None = None) -> list[WorkerSpec]:
        """Start more workers while the others run (a live plan change), each placed by
        `placement[worker_id]`; their specs as started (bound on their nodes). All or
        none: if one cannot be placed or started, those already started are stopped."""
        if self.deployment.placement is None:
            self.deployment.placement = {}
        self.deployment.placement.update(placement or {})
        started: list[str] = []
        try:
            for spec in specs:
                if spec.worker_id in self.actors:
                    raise ValueError(f"worker {spec.worker_id!r} is already running")
                started.append(spec.worker_id)
                self.start(spec)
        except BaseException:
            self.retire_workers(started)
            raise
        return [self.specs[worker_id] for worker_id in started]

    def retire_workers(self, worker_ids: list[str], drain_timeout_s: float = 30.0) -> None:
        """Stop these workers for good (a live plan change retired them): actors, processes
        and placement group; never restarted."""
        with self._lock:  # out of restart_dead's reach before they stop
            gone = [(self.actors.pop(w, None), self.host_actors.pop(w, []), self.placement_groups.pop(w, None))
                    for w in worker_ids]
            for worker_id in worker_ids:
                self.specs.pop(worker_id, None)
        for actor, hosts, group in gone:
            self._stop_worker(actor, hosts, group, drain_timeout_s)

    def _worker_actors(self, worker_id: str) -> list:
        """The worker's actors: one, or one per host of an engine that spans hosts."""
        return [self.actors[worker_id], *self.host_actors.get(worker_id, [])]

    def is_alive(self, worker_id: str) -> bool:
        import ray

        try:
            return all(ray.get([actor.alive.remote() for actor in self._worker_actors(worker_id)], timeout=5))
        except ray.exceptions.RayError as exc:  # an actor that is gone or does not answer: a dead worker
            log.warning("worker actor %s did not answer: %s", worker_id, exc)
            return False

    def alive_checks(self) -> dict:
        """Whether each worker's processes run (on every host of an engine that spans
        hosts), for the router's event loop: a check never waits on Ray (it reads the
        actor's last answer and asks again), so a worker that exits while loading stops
        the start within a second or two, as a local one does, instead of keeping it
        waiting out the start timeout."""
        def check(worker_id: str) -> bool:
            hosts = self.host_actors.get(worker_id, [])
            return self._liveness.check(worker_id, self.actors.get(worker_id)) and all(
                self._liveness.check(f"{worker_id}-host{index}", actor) for index, actor in enumerate(hosts, 1))

        return {worker_id: (lambda w=worker_id: check(w)) for worker_id in self.actors}

    def restart_dead(self) -> list[str]:
        """Start again every worker whose process exited. An engine that spans hosts starts
        again on all of them when one host's share exited (its ranks meet only at start)."""
        import ray

        restarted = []
        with self._lock:
            for worker_id, actor in self.actors.items():
                try:
                    if worker_id not in self.host_actors:
                        if ray.get(actor.restart_if_dead.remote(), timeout=10):
                            restarted.append(worker_id)
                        continue
                    actors = self._worker_actors(worker_id)
                    if not all(ray.get([a.alive.remote() for a in actors], timeout=10)):
                        ray.get([a.relaunch.remote() for a in actors], timeout=60)
                        restarted.append(worker_id)
                except ray.exceptions.RayError:  # the actor itself is gone (or the restart failed in it)
                    log.warning("could not restart worker actor %s", worker_id, exc_info=True)
        return restarted

    @staticmethod
    def _stop_worker(actor, hosts: list, group, drain_timeout_s: float) -> None:
        """Stop a worker's actors (host 0's first: it drains the requests) and its placement group."""
        import ray

        for index, one in enumerate([actor, *hosts]):
            if one is None:
                continue
            try:
                ray.get(one.stop.remote(), timeout=(drain_timeout_s if index == 0 else 0) + 15)
            except ray.exceptions.RayError as exc:  # no drain; the actor is killed next either way
                log.warning("worker actor did not stop cleanly: %s", exc)
            ray.kill(one)
        if group is not None:
            ray.util.remove_placement_group(group)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        import ray

        with self._lock:
            for worker_id, actor in self.actors.items():
                self._stop_worker(actor, self.host_actors.get(worker_id, []), self.placement_groups.pop(worker_id, None),
                                  drain_timeout_s)
            for group in self.placement_groups.values():
                ray.util.remove_placement_group(group)
            self.actors.clear()
            self.host_actors.clear()
            self.placement_groups.clear()
            self.specs.clear()
        if self._owns_ray:
            ray.shutdown()
