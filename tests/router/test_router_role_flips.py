"""Role flips without restarts, without engines: a flexible worker's spec and command line,
its kv_both connector settings, Cluster.set_plan's checks (all before any change), the
worker client's role check after a flip, and the flip counter and per-role series in /metrics.
The real flip under load is tests/router/test_router_role_flip_live.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
from test_router_cluster_retry import StandInWorker

from benchmarks.local_plans import local_plan
from common.roles import Role
from common.routing import Route
from vllm.sampling_params import SamplingParams
from engine import control_protocol as proto
from engine.worker_spec import WorkerSpec
from router.cluster import Cluster
from router.deployment import deployment_from_plan
from router.metrics import RouterMetrics
from router.worker_client import WorkerClient

# The plan's routes after decode-d1 flipped to prefill: both prefill workers feed decode-d0.
FLIPPED_ROUTES = [Route("prefill-p0", "decode-d0", 1.0), Route("decode-d1", "decode-d0", 1.0)]


class _Client:
    """What the cluster and the metrics read of a worker client."""

    def __init__(self, info: WorkerSpec):
        self.info, self.healthy, self.outstanding_tokens, self.load = info, True, 0, None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


def _cluster(flexible: bool = True, num_prefill: int = 1, num_decode: int = 2) -> Cluster:
    deployment = deployment_from_plan(local_plan(num_prefill, num_decode), model="/models/tiny",
                                      flexible_roles=flexible)
    cluster = Cluster(workers=deployment.workers, routes=deployment.routes, routing="round-robin")
    cluster.clients = {w.worker_id: _Client(w) for w in deployment.workers}
    return cluster


def test_a_flexible_worker_is_prefill_or_decode_with_a_kv_endpoint_and_says_so_on_its_command_line():
    spec = WorkerSpec("p0", Role.PREFILL, "ipc:///tmp/p0", kv_endpoint="ipc:///tmp/p0-kv", flexible=True)
    command = spec.command()
    assert command[1:3] == ["-m", "prefill"] and "--flexible-role" in command
    assert command[command.index("--kv-endpoint") + 1] == "ipc:///tmp/p0-kv"
    assert "--flexible-role" not in WorkerSpec("d0", Role.DECODE, "ipc:///tmp/d0", "ipc:///tmp/d0-kv").command()
    with pytest.raises(ValueError, match="worker p1 is flexible .* with a kv_endpoint .* kv_endpoint=None"):
        WorkerSpec("p1", Role.PREFILL, "ipc:///tmp/p1", flexible=True)
    with pytest.raises(ValueError, match="worker c0 is flexible .* got role colocated"):
        WorkerSpec("c0", Role.COLOCATED, "ipc:///tmp/c0", flexible=True)


def test_flexible_role_gives_the_engine_a_kv_both_connector_listening_on_its_kv_endpoint(tiny_model_dir, capsys):
    from engine.worker_main import COLOCATED_COMMAND_LINE, build_parser, main, settings_from_args
    from prefill.worker import COMMAND_LINE as PREFILL
    from decode.worker import COMMAND_LINE as DECODE

    base = ["--control-endpoint", "ipc:///tmp/w-ctl", "--model", tiny_model_dir]
    for command_line in (PREFILL, DECODE):
        args = build_parser(command_line).parse_args([*base, "--kv-endpoint", "ipc:///tmp/w-kv", "--flexible-role"])
        config = settings_from_args(command_line, args).kv_transfer_config
        assert config["kv_role"] == "kv_both"
        assert config["kv_connector_extra_config"]["listen_endpoint"] == "ipc:///tmp/w-kv"
    plain = settings_from_args(PREFILL, build_parser(PREFILL).parse_args(base)).kv_transfer_config
    assert plain["kv_role"] == "kv_producer"
    with pytest.raises(SystemExit) as exited:  # refused before any engine starts
        main(PREFILL, [*base, "--flexible-role"])
    assert exited.value.code == 2 and "--flexible-role needs --kv-endpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a colocated worker moves no KV: it has no such flag
        build_parser(COLOCATED_COMMAND_LINE).parse_args([*base, "--flexible-role"])


def test_flexible_roles_mark_prefill_and_decode_workers_never_colocated():
    from router.__main__ import build_parser
    from router.deployment import embedded_default
    from router.launch_ray import on_node

    plan = local_plan(1, 1)
    plan.groups.append(dataclasses.replace(plan.groups[0], id="c0", role="colocated"))
    workers = {w.worker_id: w for w in deployment_from_plan(plan, model="/m", flexible_roles=True).workers}
    assert workers["prefill-p0"].flexible and workers["decode-d0"].flexible and not workers["colocated-c0"].flexible
    assert not any(w.flexible for w in deployment_from_plan(plan, model="/m").workers)
    assert all(w.flexible for w in embedded_default(model="/m", flexible_roles=True).workers)
    assert build_parser().parse_args(["serve", "--flexible-roles"]).flexible_roles
    # On a Ray node the actor rebinds every endpoint it listens on, a flexible prefill worker's KV one too.
    placed = on_node(workers["prefill-p0"], "127.0.0.1")
    assert placed.kv_endpoint.startswith("tcp://127.0.0.1:") and "--flexible-role" in placed.command()
    assert on_node(workers["colocated-c0"], "127.0.0.1").kv_endpoint is None


def test_set_plan_flips_a_flexible_worker_and_sets_the_routes_together():
    cluster = _cluster()
    flips = cluster.set_plan({"decode-d1": Role.PREFILL}, FLIPPED_ROUTES)
    assert flips == {"decode-d1": Role.PREFILL} and cluster.role_flips == 1
    spec = next(w for w in cluster.workers if w.worker_id == "decode-d1")
    assert spec.role is Role.PREFILL and spec.flexible and cluster.clients["decode-d1"].info is spec
    assert cluster.routes == FLIPPED_ROUTES
    assert {cluster.choose_route([1, 2]).route.prefill_worker for _ in range(4)} == {"prefill-p0", "decode-d1"}
    cluster.set_plan({"decode-d1": Role.PREFILL}, FLIPPED_ROUTES)  # the same plan again flips nothing
    assert cluster.role_flips == 1


@pytest.mark.parametrize("flexible, roles, routes, message", [
    (True, {"decode-d9": Role.PREFILL}, FLIPPED_ROUTES, "unknown worker 'decode-d9'"),
    (False, {"decode-d1": Role.PREFILL}, FLIPPED_ROUTES,
     "decode-d1 cannot flip from decode to prefill: it was started without a kv_both connector.*--flexible-roles"),
    (True, {"decode-d1": Role.COLOCATED}, FLIPPED_ROUTES, "cannot flip from decode to colocated"),
    (True, {"decode-d1": "prefil"}, FLIPPED_ROUTES, "is not a role"),
    # Flipped, but the routes still send KV to it: refused, the flip too.
    (True, {"decode-d1": Role.PREFILL}, [Route("prefill-p0", "decode-d1", 1.0)],
     "route prefill-p0->decode-d1 runs from a prefill worker to a prefill worker"),
    (True, {}, [Route("prefill-p0", "decode-d9", 1.0)], "unknown worker 'decode-d9'"),
])
def test_set_plan_checks_everything_before_changing_anything(flexible, roles, routes, message):
    cluster = _cluster(flexible)
    before_workers, before_routes = list(cluster.workers), list(cluster.routes)
    with pytest.raises(ValueError, match=message):
        cluster.set_plan(roles, routes)
    assert cluster.workers == before_workers and cluster.routes == before_routes and cluster.role_flips == 0
    assert all(c.info.role is Role.DECODE for w, c in cluster.clients.items() if w.startswith("decode"))


def test_a_request_in_flight_on_a_flipped_worker_finishes_there():
    """The drain: the stream keeps its route (decode on decode-d1) across the flip; the next goes by the new plan."""
    cluster = _cluster()
    cluster.set_routes([Route("prefill-p0", "decode-d1", 1.0)])
    cluster.clients = {w.worker_id: StandInWorker(w) for w in cluster.workers}
    sampling = SamplingParams(max_tokens=4, temperature=0.0)

    async def run():
        tokens, routes = [], set()
        async for route, output in cluster.generate([1, 2, 3], sampling):
            if not tokens:
                cluster.set_plan({"decode-d1": Role.PREFILL}, FLIPPED_ROUTES)
            tokens += output.token_ids
            routes.add(route)
        following = {route async for route, _ in cluster.generate([1, 2, 3], sampling)}
        return tokens, routes, following

    tokens, routes, following = asyncio.run(run())
    assert tokens == [100, 101, 102, 103] and routes == {Route("prefill-p0", "decode-d1", 1.0)}
    assert following <= set(FLIPPED_ROUTES) and following


def test_the_client_does_not_call_a_flipped_flexible_worker_wrong(caplog):
    """A worker reports the role it started with; only a non-flexible mismatch is an error."""
    flexible = WorkerSpec("d1", Role.PREFILL, "ipc:///tmp/d1", "ipc:///tmp/d1-kv", flexible=True)  # started decode
    fixed = WorkerSpec("d2", Role.PREFILL, "ipc:///tmp/d2", "ipc:///tmp/d2-kv")

    async def pong_from(spec: WorkerSpec) -> None:
        client = WorkerClient(info=spec, ctx=None)

        class OneMessage:
            def __init__(self):
                self.sent = False

            async def recv_multipart(self):
                if self.sent:
                    raise asyncio.CancelledError
                self.sent = True
                load = proto.LoadReport(worker_id=spec.worker_id, role=Role.DECODE, num_running=0, num_waiting=0,
                                        kv_cache_usage=0.0, num_inflight=0)
                return proto.encode(proto.Pong(version=proto.PROTOCOL_VERSION, nonce=0, load=load))

        client._sock = OneMessage()
        with pytest.raises(asyncio.CancelledError):
            await client._receive_loop()
        assert client.healthy

    with caplog.at_level(logging.ERROR, logger="router.worker_client"):
        asyncio.run(pong_from(flexible))
        assert not caplog.records
        asyncio.run(pong_from(fixed))
    assert [r.getMessage() for r in caplog.records] == [
        "worker d2 reports role decode; the deployment started it as prefill"]


def test_metrics_count_flips_and_drop_a_flipped_workers_old_role_series():
    cluster = _cluster()
    metrics = RouterMetrics()
    metrics.observe_cluster(cluster)
    assert 'hexserve_worker_healthy{role="decode",worker="decode-d1"} 1.0' in metrics.render().decode()
    cluster.set_plan({"decode-d1": Role.PREFILL}, FLIPPED_ROUTES)
    metrics.observe_cluster(cluster)
    metrics.observe_cluster(cluster)  # counted once, however often /metrics is read
    text = metrics.render().decode()
    assert "hexserve_role_flips_total 1.0" in text
    assert 'hexserve_worker_healthy{role="prefill",worker="decode-d1"} 1.0' in text
    assert 'role="decode",worker="decode-d1"' not in text
