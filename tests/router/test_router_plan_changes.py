"""POST /plan changes that start and retire workers, start before retire (router.plan_changes),
on a router whose workers are stand-in worker servers in this process (real control sockets,
clients and health checks; no engine). The launcher is a stand-in too: it serves each new spec
in-process instead of spawning `python -m decode` (the real launchers' add and retire are
tested below on cheap processes, and the real change under load in
tests/router/test_router_plan_restart_live.py)."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import pytest
from test_router_cluster_retry import StandInWorker
from test_router_plan_diff import _replaced_d0

from benchmarks.local_plans import local_plan
from common.roles import Role
from common.routing import Route
from vllm.sampling_params import SamplingParams
from engine import control_protocol as proto
from engine.worker_spec import WorkerSpec
from router.cluster import Cluster
from router.deployment import deployment_from_plan
from router.launch_local import LocalLauncher
from router.metrics import RouterMetrics
from router.plan_changes import PlanChanges


class InProcessLauncher:
    """Serves each worker it starts as a stand-in WorkerServer on the test's event loop."""

    def __init__(self, loop, token_delay_s: float = 0.0, never_serve: frozenset[str] = frozenset()):
        self.loop, self.token_delay_s, self.never_serve = loop, token_delay_s, never_serve
        self.servers, self.tasks, self.added, self.retired = {}, {}, [], []

    async def serve(self, spec: WorkerSpec) -> None:
        from engine.config import EngineSettings
        from engine.standin import StandInEngine
        from engine.worker_server import WorkerServer

        server = WorkerServer(settings=EngineSettings(model="standin"), role=spec.role, worker_id=spec.worker_id,
                              control_endpoint=spec.control_endpoint,
                              engine_factory=lambda: StandInEngine(self.token_delay_s))
        self.servers[spec.worker_id] = server
        self.tasks[spec.worker_id] = asyncio.ensure_future(server.serve())

    def add_workers(self, specs, placement=None):  # called from a thread, as the real ones are
        self.added.append(([s.worker_id for s in specs], placement))
        for spec in specs:
            if spec.worker_id not in self.never_serve:
                asyncio.run_coroutine_threadsafe(self.serve(spec), self.loop).result()
        return list(specs)

    def retire_workers(self, worker_ids, drain_timeout_s: float = 30.0):
        self.retired += worker_ids
        for worker_id in worker_ids:
            if worker_id in self.servers:
                self.loop.call_soon_threadsafe(self.servers.pop(worker_id).stop)

    def alive_checks(self):
        return {}

    def log_location(self, worker_id: str) -> str:
        return f"{worker_id}.log"

    async def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def _router(tiny_model_dir, launcher_options=None, ready_timeout_s=30.0):
    """A 1p1d router on stand-in workers: (app client, cluster, plan changes, launcher, metrics)."""
    from transformers import AutoTokenizer

    from engine.tiny_model import TINY_MODEL_NAME
    from router.app import create_app
    from router.prepare import RouterSettings

    deployment = deployment_from_plan(local_plan(1, 1), model=tiny_model_dir, worker_link="tcp")
    launcher = InProcessLauncher(asyncio.get_running_loop(), **(launcher_options or {}))
    for spec in deployment.workers:
        await launcher.serve(spec)
    cluster = Cluster(workers=deployment.workers, routes=deployment.routes, kv_connector="none", routing="round-robin",
                      health_interval_s=0.05)
    await cluster.start()
    await cluster.wait_ready(30)
    metrics = RouterMetrics()
    changes = PlanChanges(cluster, launcher, deployment.settings, metrics, ready_timeout_s=ready_timeout_s,
                          poll_interval_s=0.02)
    app = create_app(cluster, RouterSettings(TINY_MODEL_NAME, 1024), AutoTokenizer.from_pretrained(tiny_model_dir),
                     metrics=metrics, plan_source="plan.json", plan_changes=changes)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")
    return client, cluster, changes, launcher, metrics


async def _close(client, cluster, changes, launcher) -> None:
    await client.aclose()
    await changes.close()
    await cluster.close()
    await launcher.stop()


def _complete(client, prompt: str, max_tokens: int = 4):
    from engine.tiny_model import TINY_MODEL_NAME

    return client.post("/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens})


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_new_workers_start_first_then_the_left_out_one_drains_and_retires(tiny_model_dir):
    async def scenario():
        client, cluster, changes, launcher, metrics = await _router(tiny_model_dir, {"token_delay_s": 0.02})
        try:
            in_flight = asyncio.ensure_future(_complete(client, "on decode-d0 across the change", max_tokens=20))
            await _until(lambda: cluster.in_use("decode-d0"))
            answer = await client.post("/plan", json=_replaced_d0().to_json())
            during = (await client.get("/plan")).json()["change"]
            second = await client.post("/plan", json=local_plan(1, 1).to_json())
            await changes.wait()
            finished = await in_flight
            after = [await _complete(client, f"after {i}") for i in range(4)]
            return (answer, during, second, finished, after, (await client.get("/plan")).json(),
                    (await client.get("/metrics")).text, dict(cluster.clients), list(cluster.routes), launcher)
        finally:
            await _close(client, cluster, changes, launcher)

    answer, during, second, finished, after, view, metrics, clients, routes, launcher = asyncio.run(scenario())
    assert answer.status_code == 202, answer.text
    entry = answer.json()
    assert entry["action"] == "change" and entry["starts"] == ["decode-d1", "decode-d2"]
    assert entry["retires"] == ["decode-d0"] and "retire decode-d0 (group d0): not in the plan" in entry["changes"]
    assert during["id"] == entry["id"] and during["state"] == "starting"
    assert second.status_code == 409 and second.json()["error"]["code"] == "plan_change_in_progress"
    assert second.json()["error"]["message"].startswith(f"plan change {entry['id']} is in progress (starting: start decode-d1")
    # The request on decode-d0 finished there; decode-d0 was retired after it.
    assert finished.status_code == 200 and finished.json()["usage"]["completion_tokens"] == 20
    assert all(a.status_code == 200 for a in after)
    assert launcher.added == [(["decode-d1", "decode-d2"], {"decode-d1": _CPU, "decode-d2": _CPU})]
    assert launcher.retired == ["decode-d0"]
    # Not cut short and moved elsewhere (a stream whose decode worker goes migrates): it ran to its end on decode-d0.
    assert "hexserve_migrated_requests 0.0" in metrics and "hexserve_request_retries_total 0.0" in metrics
    assert set(clients) == {"prefill-p0", "decode-d1", "decode-d2"}
    assert routes == [Route("prefill-p0", "decode-d1", 1.0), Route("prefill-p0", "decode-d2", 1.0)]
    change = view["history"][-1]
    assert view["change"] is None and change["state"] == "done" and change["id"] == entry["id"]
    steps = [s["step"] for s in change["steps"]]
    assert steps == ["accepted", "start", "healthy", "healthy", "routes", "drain", "retire", "retired", "done"], steps
    assert change["steps"][5]["detail"] == "waiting for the requests on decode-d0"
    assert set(view["workers"]) == {"prefill-p0", "decode-d1", "decode-d2"}
    assert "hexserve_workers_started_total 2.0" in metrics and "hexserve_workers_retired_total 1.0" in metrics
    assert 'hexserve_plan_changes_total{outcome="done"} 1.0' in metrics
    assert 'hexserve_plan_changes_total{outcome="refused"} 1.0' in metrics  # the 409
    assert 'worker="decode-d0"' not in metrics.replace('decode="decode-d0"', "")  # its series are gone
    picks = {line.split('decode="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("hexserve_route_requests_total{")}
    assert picks == {"decode-d0": 1.0, "decode-d1": 2.0, "decode-d2": 2.0}, picks  # round robin over the new routes


_CPU = {"nodes": ["cpu"], "gpu_types": {"CPU": 1}, "num_gpus": 1}


def test_a_new_worker_that_never_answers_is_stopped_and_the_running_plan_is_untouched(tiny_model_dir):
    async def scenario():
        client, cluster, changes, launcher, metrics = await _router(
            tiny_model_dir, {"never_serve": frozenset({"decode-d2"})}, ready_timeout_s=1.0)
        try:
            before = (list(cluster.routes), set(cluster.clients))
            answer = await client.post("/plan", json=_replaced_d0().to_json())
            await changes.wait()
            served = await _complete(client, "still served by decode-d0")
            return (answer, before, (list(cluster.routes), set(cluster.clients), [w.worker_id for w in cluster.workers]),
                    served, (await client.get("/plan")).json(), (await client.get("/metrics")).text, launcher)
        finally:
            await _close(client, cluster, changes, launcher)

    answer, before, after, served, view, metrics, launcher = asyncio.run(scenario())
    assert answer.status_code == 202
    assert after[:2] == before and after[2] == ["prefill-p0", "decode-d0"]  # nothing half-applied
    assert served.status_code == 200
    assert launcher.retired == ["decode-d1", "decode-d2"]  # both new workers stopped, decode-d0 kept
    change = view["history"][-1]
    assert change["state"] == "failed" and view["change"] is None
    assert "decode-d2" in change["error"] and "did not become healthy" in change["error"]
    assert "the running plan is unchanged (read decode-d1.log, decode-d2.log)" in change["error"]
    assert [s["step"] for s in change["steps"]][-1] == "failed"
    assert 'hexserve_plan_changes_total{outcome="failed"} 1.0' in metrics and "hexserve_workers_started_total 0.0" in metrics


def test_dry_run_reports_the_starts_and_retires_and_nothing_starts(tiny_model_dir):
    async def scenario():
        client, cluster, changes, launcher, _ = await _router(tiny_model_dir)
        try:
            answer = await client.post("/plan?dry_run=true", json=_replaced_d0().to_json())
            return answer, (await client.get("/plan")).json(), launcher.added, set(cluster.clients)
        finally:
            await _close(client, cluster, changes, launcher)

    answer, view, added, clients = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.json()["action"] == "dry_run"
    assert answer.json()["starts"] == ["decode-d1", "decode-d2"] and answer.json()["retires"] == ["decode-d0"]
    assert added == [] and clients == {"prefill-p0", "decode-d0"}
    assert view["change"] is None and [h["action"] for h in view["history"]] == ["start"]


@pytest.mark.parametrize("mutate, param", [
    (lambda d: {**d, "routes": []}, "routes"),
    (lambda d: {**d, "routes": [{**d["routes"][0], "decode": "d9"}]}, "routes[0].decode"),
])
def test_a_plan_without_routes_or_with_unknown_groups_is_still_refused(tiny_model_dir, mutate, param):
    async def scenario():
        client, cluster, changes, launcher, _ = await _router(tiny_model_dir)
        try:
            answer = await client.post("/plan", json=mutate(_replaced_d0().to_json()))
            return answer, launcher.added, (await client.get("/metrics")).text
        finally:
            await _close(client, cluster, changes, launcher)

    answer, added, metrics = asyncio.run(scenario())
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert added == [] and 'hexserve_plan_changes_total{outcome="refused"} 1.0' in metrics


def test_a_route_only_plan_is_applied_at_once_with_a_launcher_too(tiny_model_dir):
    async def scenario():
        client, cluster, changes, launcher, _ = await _router(tiny_model_dir)
        try:
            plan = local_plan(1, 1)
            plan.routes[0].rate_rps = 2.0
            return await client.post("/plan", json=plan.to_json()), list(cluster.routes), launcher.added
        finally:
            await _close(client, cluster, changes, launcher)

    answer, routes, added = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.json()["action"] == "apply" and "state" not in answer.json()
    assert routes == [Route("prefill-p0", "decode-d0", 2.0)] and added == []


def test_a_request_whose_prefill_runs_keeps_its_decode_worker_in_use():
    """The drain's signal: from the route's pick, before decode-d0 holds anything of the request."""
    infos = [WorkerSpec("p0", Role.PREFILL, "tcp://x:1"), WorkerSpec("d0", Role.DECODE, "tcp://x:2", "tcp://x:12")]
    cluster = Cluster(workers=infos, routes=[Route("p0", "d0", 1.0)], kv_connector="none")

    class SlowPrefill(StandInWorker):
        async def generate(self, *args, **kwargs):
            await self.gate.wait()
            async for output in super().generate(*args, **kwargs):
                yield output

    async def scenario():
        prefill = SlowPrefill(infos[0])
        prefill.gate = asyncio.Event()
        cluster.clients = {"p0": prefill, "d0": StandInWorker(infos[1])}
        request = asyncio.ensure_future(_drain(cluster.generate([1, 2, 3], SamplingParams(max_tokens=2))))
        await asyncio.sleep(0.01)
        during = (cluster.in_use("d0"), cluster.clients["d0"].calls == [])
        prefill.gate.set()
        await request
        return during, cluster.in_use("d0"), cluster.in_use("p0")

    (in_use, decode_idle), after_d0, after_p0 = asyncio.run(scenario())
    assert in_use and decode_idle and not after_d0 and not after_p0


async def _drain(stream) -> list:
    return [item async for item in stream]


def test_remove_worker_refuses_a_worker_a_route_still_names():
    infos = [WorkerSpec("p0", Role.PREFILL, "tcp://x:1"), WorkerSpec("d0", Role.DECODE, "tcp://x:2", "tcp://x:12")]
    cluster = Cluster(workers=infos, routes=[Route("p0", "d0", 1.0)])
    with pytest.raises(ValueError, match=r"worker d0 is still on route\(s\) \['p0->d0'\]"):
        asyncio.run(cluster.remove_worker("d0"))
    assert [w.worker_id for w in cluster.workers] == ["p0", "d0"]


class _Sleeper(WorkerSpec):
    """A worker spec whose process only sleeps: the launcher's bookkeeping without an engine."""

    __slots__ = ()

    def launch_command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(120)"]


def test_the_local_launcher_adds_workers_and_retires_them_for_good(tmp_path):
    launcher = LocalLauncher(log_dir=tmp_path)
    try:
        launcher.start(_Sleeper("w0", Role.DECODE, "tcp://127.0.0.1:1"))
        added = launcher.add_workers([_Sleeper("w1", Role.DECODE, "tcp://127.0.0.1:2"),
                                      _Sleeper("w2", Role.DECODE, "tcp://127.0.0.1:3")])
        assert [s.worker_id for s in added] == ["w1", "w2"] and launcher.is_alive("w1") and launcher.is_alive("w2")
        pid = launcher.processes["w1"].pid
        launcher.retire_workers(["w1"], drain_timeout_s=5)
        assert not launcher.is_alive("w1") and "w1" not in launcher.specs and launcher.is_alive("w0")
        with pytest.raises(ProcessLookupError):
            __import__("os").kill(pid, 0)
        assert launcher.restart_dead() == [] and "w1" not in launcher.processes  # never started again
        # All or none: a name already running refuses the batch, and what it started is stopped.
        with pytest.raises(ValueError, match="worker 'w0' is already running"):
            launcher.add_workers([_Sleeper("w3", Role.DECODE, "tcp://127.0.0.1:4"), _Sleeper("w0", Role.DECODE, "x")])
        assert "w3" not in launcher.processes and set(launcher.specs) == {"w0", "w2"}
    finally:
        launcher.stop(drain_timeout_s=5)


class _CounterWriter(WorkerSpec):
    """A worker spec whose process writes KV counters where a connector would, then sleeps."""

    __slots__ = ()

    def launch_command(self) -> list[str]:
        code = ("import time; from kvtransfer.stats import Stats, default_stats_path; "
                "s = Stats(default_stats_path('consumer')); s.add('bytes_received'); s.flush(force=True); time.sleep(120)")
        return [sys.executable, "-c", code]


def _counter_folders(worker_id: str, timeout_s: float = 30.0, count: int = 1) -> list:
    from router.launch_local import kv_stats_folder

    deadline = time.monotonic() + timeout_s
    while len(found := sorted(kv_stats_folder(worker_id).glob("hexserve-kvstats-*/counters.json"))) < count:
        assert time.monotonic() < deadline, f"no counters of {worker_id} in {kv_stats_folder(worker_id)}"
        time.sleep(0.05)
    return [path.parent for path in found]


def test_a_killed_workers_counters_go_when_it_restarts_and_when_the_launcher_stops(tmp_path):
    """A SIGKILLed worker cannot remove its counters folder (its name has a random part): the
    launcher gives each worker a folder of its own for them, and removes it."""
    from router.launch_local import kv_stats_folder

    launcher = LocalLauncher(log_dir=tmp_path)
    try:
        launcher.start(_CounterWriter("w0", Role.DECODE, "tcp://127.0.0.1:1"))
        [first] = _counter_folders("w0")
        launcher.kill("w0")
        assert first.exists()  # nobody removed it
        assert launcher.restart_dead() == ["w0"]
        [second] = _counter_folders("w0")
        assert not first.exists() and second != first
    finally:
        launcher.stop(drain_timeout_s=5)
    assert not kv_stats_folder("w0").exists()


def test_the_ray_launcher_places_added_workers_by_their_groups_and_a_stopped_actor_never_restarts(monkeypatch):
    from router.deployment import Deployment
    from router.launch_ray import RayLauncher, _WorkerActor

    monkeypatch.setattr(RayLauncher, "__post_init__", lambda self: None)  # no Ray: the bookkeeping only
    deployment = Deployment(workers=[], routes=[], model_path="/m", served_model_name="m", max_model_len=64)
    launcher = RayLauncher(address="auto", deployment=deployment)
    seen, retired = [], []

    def start(spec):
        seen.append((spec.worker_id, launcher.deployment.placement[spec.worker_id]))
        if spec.worker_id == "bad":
            raise RuntimeError("Ray could not place worker bad")
        launcher.specs[spec.worker_id] = spec
        launcher.actors[spec.worker_id] = object()
        return spec

    monkeypatch.setattr(launcher, "start", start)
    monkeypatch.setattr(launcher, "retire_workers", lambda ids, drain_timeout_s=30.0: retired.append(list(ids)))
    good = WorkerSpec("decode-d1", Role.DECODE, "tcp://x:1", "tcp://x:2")
    assert launcher.add_workers([good], {"decode-d1": {"nodes": ["n1"], "gpu_types": {"H100": 2}}}) == [good]
    assert seen == [("decode-d1", {"nodes": ["n1"], "gpu_types": {"H100": 2}})]
    with pytest.raises(RuntimeError, match="could not place"):
        launcher.add_workers([WorkerSpec("d2", Role.DECODE, "tcp://x:3", "tcp://x:4"),
                              WorkerSpec("bad", Role.DECODE, "tcp://x:5", "tcp://x:6")], {"d2": {}, "bad": {}})
    assert retired == [["d2", "bad"]]  # all or none

    actor = _WorkerActor.__new__(_WorkerActor)
    actor.stopped, actor.launcher, actor.spec = False, LocalLauncher.__new__(LocalLauncher), good
    actor.launcher.processes, actor.launcher._lock = {}, __import__("threading").Lock()
    actor.launcher.stop = lambda: None
    actor.stop()
    assert actor.restart_if_dead() is False  # retired: stopped, and not started again


def test_metrics_drop_every_series_of_a_worker_that_left_the_cluster():
    infos = [WorkerSpec("p0", Role.PREFILL, "tcp://x:1"), WorkerSpec("d0", Role.DECODE, "tcp://x:2", "tcp://x:12")]
    cluster = Cluster(workers=infos, routes=[Route("p0", "d0", 1.0)])
    cluster.clients = {i.worker_id: StandInWorker(i) for i in infos}
    for client in cluster.clients.values():
        client.load = proto.LoadReport(worker_id=client.worker_id, role=client.info.role, num_running=0,
                                       num_waiting=0, kv_cache_usage=0.0, num_inflight=0,
                                       kv_stats={"transfers_loaded_ok": 3.0})
    metrics = RouterMetrics()
    metrics.observe_cluster(cluster)
    assert 'hexserve_kv_transfer{stat="transfers_loaded_ok",worker="d0"} 3.0' in metrics.render().decode()
    del cluster.clients["d0"]
    metrics.observe_cluster(cluster)
    text = metrics.render().decode()
    assert 'worker="d0"' not in text and 'worker="p0"' in text

