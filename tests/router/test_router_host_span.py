"""A group whose stages sit on several hosts: how it becomes one engine across them, checked before anything starts.

The engine itself, served across two lab hosts, is tests/lab/test_lab_host_span.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from common.ray_resources import gpu_type_resource, node_resource
from engine.config import tiny_model_settings
from engine.worker_main import build_parser
from engine.worker_spec import WorkerSpec
from decode.worker import COMMAND_LINE as DECODE_COMMAND_LINE
from router.deployment import deployment_from_plan
from router.host_span import HostShare, host_bundles, host_shares, shared_fields


def _stages(*nodes: str, tp: int = 1) -> list[dict]:
    return [{"node": node, "gpu_type": "FAST" if node == "h0" else "SLOW", "gpus": tp, "ranks": tp} for node in nodes]


def test_a_group_on_one_host_or_with_one_rank_is_no_span():
    assert host_shares("w", {"stages": _stages("h0", "h0")}, 2) is None
    assert host_shares("w", {"stages": _stages("h0")}, 1) is None
    assert host_shares("w", {}, 4) is None


def test_stages_on_each_host_merge_into_its_share_in_rank_order():
    shares = host_shares("w", {"stages": _stages("h0", "h0", "h1", "h1", tp=2)}, 8)
    assert shares == [HostShare("h0", "FAST", 4, 4), HostShare("h1", "SLOW", 4, 4)]


def test_layouts_vllm_cannot_run_across_hosts_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"different numbers of ranks \(h0: 2, h1: 1\).*max_pipeline_stages 1"):
        host_shares("decode-g1", {"stages": _stages("h0", "h0", "h1")}, 3)
    with pytest.raises(ValueError, match="come back to node h0"):
        host_shares("decode-g1", {"stages": _stages("h0", "h1", "h0", "h1")}, 4)


def test_each_host_gets_a_bundle_on_its_own_node():
    shares = [HostShare("h0", "FAST", 2, 2), HostShare("h1", "SLOW", 2, 2)]
    bundles = host_bundles(shares, use_gpus=True, named=frozenset({"h0", "h1"}))
    assert bundles[0] == {gpu_type_resource("FAST"): 2.0, "CPU": 1.0, "GPU": 2.0, node_resource("h0"): 0.001}
    assert node_resource("h1") in bundles[1] and gpu_type_resource("SLOW") in bundles[1]
    assert node_resource("h0") not in host_bundles(shares, use_gpus=False, named=frozenset())[0]


def test_hosts_share_every_ranks_endpoint_the_meeting_point_and_the_smallest_cache():
    spec = WorkerSpec("decode-g1", "decode", "tcp://10.0.0.1:21000", "tcp://10.0.0.1:21010", tensor_parallel_size=2,
                      pipeline_parallel_size=2, layer_partition=(2, 2))
    bound = [dataclasses.replace(spec, kv_cache_blocks=64),
             dataclasses.replace(spec, control_endpoint="tcp://10.0.0.2:23000", kv_endpoint="tcp://10.0.0.2:23010",
                                 kv_cache_blocks=32)]
    shared = shared_fields(bound, master_port=29500)
    assert shared["kv_endpoint"].split(",") == ["tcp://10.0.0.1:21010", "tcp://10.0.0.1:21011",
                                                "tcp://10.0.0.2:23010", "tcp://10.0.0.2:23011"]
    assert shared["nnodes"] == 2 and shared["master_endpoint"] == "tcp://10.0.0.1:29500"
    assert shared["kv_cache_blocks"] == 32
    host1 = dataclasses.replace(bound[1], node_rank=1, **shared)
    command = host1.command()
    assert command[command.index("--nnodes") + 1:command.index("--nnodes") + 8] == [
        "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500"]
    assert "kv_endpoint" not in shared_fields([dataclasses.replace(b, kv_endpoint=None, role="prefill") for b in bound], 1)


def test_a_spec_across_hosts_needs_even_ranks_and_a_meeting_point():
    with pytest.raises(ValueError, match="spans 2 hosts: they must share its 3 ranks evenly"):
        WorkerSpec("w", "prefill", "tcp://a:1", tensor_parallel_size=3, nnodes=2, master_endpoint="tcp://a:2")
    with pytest.raises(ValueError, match="meet at a master_endpoint"):
        WorkerSpec("w", "prefill", "tcp://a:1", tensor_parallel_size=2, nnodes=2)
    with pytest.raises(ValueError, match="meet at a master_endpoint tcp://HOST:PORT"):
        WorkerSpec("w", "prefill", "tcp://a:1", tensor_parallel_size=2, nnodes=2, master_endpoint="ipc:///tmp/m")


def test_a_headless_hosts_command_line_builds_the_heads_engine_config():
    parser = build_parser(DECODE_COMMAND_LINE)
    args = parser.parse_args(["--kv-endpoint", "tcp://10.0.0.1:1,tcp://10.0.0.2:2", "--pipeline-parallel-size", "2",
                              "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500"])
    assert args.control_endpoint is None  # a headless host has none
    settings = tiny_model_settings(pipeline_parallel_size=2, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                                   master_port=29500)
    kwargs = settings.engine_kwargs()
    assert kwargs["distributed_executor_backend"] == "mp" and kwargs["nnodes"] == 2 and kwargs["node_rank"] == 1
    assert (kwargs["master_addr"], kwargs["master_port"]) == ("10.0.0.1", 29500)
    assert "nnodes" not in tiny_model_settings().engine_kwargs()
    with pytest.raises(ValueError, match="needs --master-addr and --master-port"):
        tiny_model_settings(pipeline_parallel_size=2, nnodes=2)
    with pytest.raises(ValueError, match="must divide the engine's ranks"):
        tiny_model_settings(pipeline_parallel_size=3, nnodes=2, master_addr="a", master_port=1)


def test_a_plan_for_the_tiny_model_keeps_its_stages_and_says_where_each_runs():
    stages = [StagePlan("h0", "FAST", ["h0:1"], 1, [0, 2]), StagePlan("h1", "SLOW", ["h1:0"], 1, [2, 4])]
    decode = GroupPlan(id="g1", role="decode", gpus=["h0:1", "h1:0"], gpu_types={"FAST": 1, "SLOW": 1},
                       nodes=["h0", "h1"], region="lab", tp=1, pp=2, layer_partition=[2, 2], stages=stages,
                       capacity_rps=1.0, load_rps=1.0, batch=8, latency_ms=1.0, service_ms=1.0, kv_budget_ms=0.0)
    prefill = GroupPlan(id="g0", role="prefill", gpus=["h0:0"], gpu_types={"FAST": 1}, nodes=["h0"], region="lab",
                        tp=1, pp=1, layer_partition=[4], stages=[StagePlan("h0", "FAST", ["h0:0"], 1, [0, 4])],
                        capacity_rps=1.0, load_rps=1.0, batch=8, latency_ms=1.0, service_ms=1.0, kv_budget_ms=0.0)
    plan = Plan(mode="disaggregated", cluster="lab", model={"name": "hexserve-tiny-llama"}, workload={},
                groups=[prefill, decode], routes=[RoutePlan("g0", "g1", 1.0, 1.0, 0.0, 0.0)], unused_gpus=[],
                predicted=Predicted(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, None))
    deployment = deployment_from_plan(plan)
    decode_spec = next(w for w in deployment.workers if w.role == "decode")
    assert decode_spec.pipeline_parallel_size == 2 and decode_spec.layer_partition == (2, 2)
    assert deployment.placement["decode-g1"]["stages"] == [
        {"node": "h0", "gpu_type": "FAST", "gpus": 1, "ranks": 1}, {"node": "h1", "gpu_type": "SLOW", "gpus": 1, "ranks": 1}]
    assert "stages" not in deployment.placement["prefill-g0"]  # one rank: nothing to span
    plan.model = {"name": "Llama-2-70B"}  # another model's plan, rehearsed with the tiny one: one rank per group
    assert all(w.num_ranks == 1 for w in deployment_from_plan(plan).workers)
