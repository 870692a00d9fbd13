"""Deployment from a plan: ports, pipeline splits and KV layouts, checked before anything starts."""

from __future__ import annotations

import logging
import socket

import pytest

from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from common.roles import Role
from common.routing import Route
from prefill import prefill_kv_params
from router.deployment import deployment_from_plan
from common.ports import free_tcp_port


def _group(group_id: str, role: str, tp: int = 1, pp: int = 1) -> GroupPlan:
    gpus = [f"n0:{i}" for i in range(tp * pp)]
    stages = [StagePlan(node="n0", gpu_type="H100", gpus=gpus[s * tp : (s + 1) * tp], tp=tp, layers=[s * 80 // pp, (s + 1) * 80 // pp]) for s in range(pp)]
    return GroupPlan(id=group_id, role=role, gpus=gpus, gpu_types={"H100": tp * pp}, nodes=["n0"], region="local",
                     tp=tp, pp=pp, layer_partition=[80 // pp] * pp, stages=stages, capacity_rps=1.0, load_rps=1.0,
                     batch=8, latency_ms=10.0, service_ms=10.0, kv_budget_ms=5.0)


def _plan(prefill: GroupPlan, decode: GroupPlan) -> Plan:
    return Plan(mode="disaggregated", cluster="t", model={"name": "Llama-2-70B"}, workload={}, groups=[prefill, decode],
                routes=[RoutePlan(prefill=prefill.id, decode=decode.id, weight=1.0, rate_rps=1.0, kv_gb_per_s=1.0, transfer_ms=1.0)],
                unused_gpus=[], predicted=Predicted(1.0, 10.0, 50.0, 10.0, 1.0, 1.0, 1.0, None))


def _assert_held_for_the_worker(spec, ranks: int) -> None:
    """The KV endpoint's ports, one per rank, are held for the worker (common.ports): a plain
    bind is refused, the worker's ZeroMQ-style bind (SO_REUSEADDR) is not; once the worker
    is gone (release_endpoint_ports), they are free."""
    from router.launch_local import release_endpoint_ports

    port = int(spec.kv_endpoint.rsplit(":", 1)[1])
    for rank in range(ranks):
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("127.0.0.1", port + rank))
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port + rank))
    release_endpoint_ports(spec)
    for rank in range(ranks):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port + rank))


def test_tp_decode_worker_gets_one_port_per_rank():
    plan = _plan(_group("p0", "prefill", tp=2), _group("d0", "decode", tp=4))
    deployment = deployment_from_plan(plan, model="/models/llama", worker_link="tcp")
    decode = next(w for w in deployment.workers if w.role == "decode")
    assert decode.tensor_parallel_size == 4
    _assert_held_for_the_worker(decode, ranks=4)  # rank r listens on port + r (kvtransfer.rank_endpoint)


def test_pipelined_groups_deploy_and_decode_tells_prefill_its_split():
    decode_group = _group("d0", "decode", tp=2, pp=2)
    decode_group.layer_partition = [50, 30]  # the planner's uneven split
    plan = _plan(_group("p0", "prefill", tp=1, pp=4), decode_group)
    deployment = deployment_from_plan(plan, model="/models/llama", worker_link="tcp")
    prefill, decode = sorted(deployment.workers, key=lambda w: w.role != "prefill")
    assert prefill.process_env()["VLLM_PP_LAYER_PARTITION"] == "20,20,20,20"
    assert decode.process_env()["VLLM_PP_LAYER_PARTITION"] == "50,30"
    _assert_held_for_the_worker(decode, ranks=4)  # one port per rank: stage x TP + TP rank (kvtransfer.rank_endpoint)
    info = next(w for w in deployment.workers if w.role == "decode")
    assert info.layer_partition == info.layers_per_stage == (50, 30) and info.tensor_parallel_size == 2
    params = prefill_kv_params(info, "t1", "zmq")
    assert params["decode_layers"] == [50, 30] and params["decode_tp"] == 2
    # Rehearsal on this machine runs the tiny model with TP = PP = 1.
    assert all(w.pipeline_parallel_size == 1 and not w.process_env() for w in deployment_from_plan(plan).workers)


def test_local_workers_talk_over_unix_sockets_one_per_rank():
    """Default for workers on this machine: ipc, a socket file per worker, purpose and rank, each bindable."""
    import zmq

    from kvtransfer import rank_endpoint
    from common.sockets import make_socket
    from router.launch_local import remove_endpoint_files, run_socket_folder

    plan = _plan(_group("p0", "prefill", tp=2), _group("d0", "decode", tp=2, pp=2))
    workers = deployment_from_plan(plan, model="/models/llama").workers
    decode = next(w for w in workers if w.role == "decode")
    assert decode.kv_endpoint.startswith("ipc://") and decode.worker_id in decode.kv_endpoint
    endpoints = [w.control_endpoint for w in workers] + [w.kv_endpoint for w in workers]
    assert all(e.startswith("ipc://") for e in endpoints) and len(set(endpoints)) == 4  # no TCP port to race for
    endpoints = {rank_endpoint(decode.kv_endpoint, rank) for rank in range(decode.num_ranks)}
    assert len(endpoints) == 4
    ctx = zmq.Context()
    sockets = [make_socket(ctx, zmq.PULL, endpoint, bind=True) for endpoint in endpoints]  # makes the folder too
    try:
        push = make_socket(ctx, zmq.PUSH, rank_endpoint(decode.kv_endpoint, 3), bind=False)
        push.send(b"kv")
        receiver = next(s for s in sockets if s.getsockopt(zmq.LAST_ENDPOINT).decode().endswith(".rank3"))
        assert receiver.poll(5000) and receiver.recv() == b"kv"
        push.close(linger=0)
    finally:
        for sock in sockets:
            sock.close(linger=0)
        ctx.term()
        remove_endpoint_files(decode)
        run_socket_folder().rmdir()  # the sockets made it; a launcher's stop removes it so
    with pytest.raises(ValueError, match="worker link"):
        deployment_from_plan(plan, model="/models/llama", worker_link="udp")


def test_route_whose_kv_cannot_be_resharded_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="router.deployment"):
        deployment_from_plan(_plan(_group("p0", "prefill", tp=2), _group("d0", "decode", tp=3)), model="/models/llama")
    assert "p0 (tp=2) -> d0 (tp=3)" in caplog.text and "recompute" in caplog.text
    for prefill_tp, decode_tp in ((2, 2), (1, 2), (2, 4), (2, 1), (4, 2)):  # equal, or heads split / merged
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="router.deployment"):
            deployment_from_plan(_plan(_group("p0", "prefill", tp=prefill_tp), _group("d0", "decode", tp=decode_tp)), model="/models/llama")
        assert "recompute" not in caplog.text


def test_free_tcp_port_finds_consecutive_ports():
    port = free_tcp_port("127.0.0.1", 3)
    for offset in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port + offset))


def test_a_stopped_workers_socket_files_and_arrival_marks_are_removed(tmp_path):
    from kvtransfer.arrivals import ArrivalMarks, arrivals_dir
    from kvtransfer import rank_endpoint
    from engine.worker_spec import WorkerSpec
    from router.launch_local import remove_endpoint_files

    spec = WorkerSpec(worker_id="decode-d0", role="decode", control_endpoint=f"ipc://{tmp_path}/ctl.sock",
                      kv_endpoint=f"ipc://{tmp_path}/kv.sock", tensor_parallel_size=2)
    files = [tmp_path / "ctl.sock", tmp_path / "kv.sock", tmp_path / "kv.sock.rank1"]
    for file in files:
        file.touch()  # as a killed worker leaves them
    for rank in range(2):
        ArrivalMarks(rank_endpoint(spec.kv_endpoint, rank)).mark("t")
    remove_endpoint_files(spec)
    assert not any(f.exists() for f in files)
    assert not any(arrivals_dir(rank_endpoint(spec.kv_endpoint, rank)).exists() for rank in range(2))
    remove_endpoint_files(spec)  # nothing left: no error


def test_worker_spec_checks_its_role_and_pipeline_split():
    from engine.worker_spec import WorkerSpec

    with pytest.raises(ValueError, match="worker w0 role='prefil' is not a role"):
        WorkerSpec("w0", "prefil", "ipc:///tmp/w0")
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 but layer_partition=\\[\\]"):
        WorkerSpec("w0", Role.DECODE, "ipc:///tmp/w0", pipeline_parallel_size=2)
    spec = WorkerSpec("w0", "decode", "ipc:///tmp/w0", "ipc:///tmp/w0-kv", pipeline_parallel_size=2, layer_partition=(3, 1))
    assert spec.role is Role.DECODE and spec.num_ranks == 2 and spec.layers_per_stage == (3, 1)
    command = spec.command()
    assert command[1:3] == ["-m", "decode"] and command[command.index("--kv-endpoint") + 1] == "ipc:///tmp/w0-kv"
    assert WorkerSpec("w1", Role.PREFILL, "ipc:///tmp/w1").layers_per_stage is None


def test_colocated_group_becomes_a_colocated_worker_routed_to_itself():
    group = _group("c0", "colocated", tp=2)
    plan = _plan(_group("p0", "prefill"), _group("d0", "decode"))
    plan.groups.append(group)
    deployment = deployment_from_plan(plan, model="/models/llama")
    colocated = next(w for w in deployment.workers if w.group_id == "c0")
    assert colocated.role is Role.COLOCATED and colocated.worker_id == "colocated-c0"
    assert colocated.kv_endpoint is None and colocated.tensor_parallel_size == 2
    assert colocated.command()[1:3] == ["-m", "engine"]
    assert Route("colocated-c0", "colocated-c0", 1.0) in deployment.routes
    assert {w.role for w in deployment.workers} == {Role.PREFILL, Role.DECODE, Role.COLOCATED}
