"""Cluster-level retry and routing with stand-in workers (the real-process tests prove the rest)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from common.roles import Role
from vllm.sampling_params import SamplingParams
from engine import control_protocol as proto
from kvtransfer import prompt_hash
from kvtransfer.handoff import DecodeHandoff
from prefill import PREFILL_SAMPLING
from router.cluster import Cluster
from common.routing import Route
from engine.worker_spec import WorkerSpec
from router.worker_client import WorkerUnavailable


@dataclass
class StandInWorker:
    info: WorkerSpec
    fail_after_tokens: int | None = None  # raise WorkerUnavailable after emitting this many tokens
    healthy: bool = True
    outstanding_tokens: int = 0
    num_inflight: int = 0  # requests the worker client holds (Cluster.in_use reads it)
    calls: list = field(default_factory=list)

    @property
    def worker_id(self):
        return self.info.worker_id

    async def generate(self, request_id, prompt_token_ids, sampling, kv_transfer_params=None):
        self.calls.append(Call(request_id, list(prompt_token_ids), sampling, kv_transfer_params))
        for i in range(sampling.max_tokens):
            if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                self.healthy = False  # as the router's health check would soon say
                raise WorkerUnavailable(f"{self.worker_id} died")
            await asyncio.sleep(0)
            last = i == sampling.max_tokens - 1
            yield proto.Output(version=1, request_id=request_id, token_ids=[100 + i], text=f"t{i}", finished=last,
                               finish_reason="length" if last else None,
                               kv_transfer_params=_handoff(prompt_token_ids, kv_transfer_params) if last else None)


@dataclass
class Call:
    """One request a stand-in worker received."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    kv_transfer_params: dict | None


def _handoff(prompt_token_ids, request_params: dict | None) -> dict:
    """What a prefill's connector returns when its KV went out (kvtransfer.scheduler_side.request_finished)."""
    if not request_params or not request_params.get("do_remote_decode"):
        return {"do_remote_prefill": True}
    return DecodeHandoff(transfer_id=request_params["transfer_id"], num_prompt_tokens=len(prompt_token_ids),
                         prompt_hash=prompt_hash(prompt_token_ids),
                         decode_endpoint=request_params["decode_endpoint"]).to_params()


def _cluster(decode_fail: dict[str, int | None], kv_connector: str = "none") -> Cluster:
    infos = [WorkerSpec("p0", Role.PREFILL, "tcp://x:1"), WorkerSpec("p1", Role.PREFILL, "tcp://x:2"),
             WorkerSpec("d0", Role.DECODE, "tcp://x:3", "tcp://x:13"), WorkerSpec("d1", Role.DECODE, "tcp://x:4", "tcp://x:14")]
    cluster = Cluster(workers=infos, routes=[Route("p0", "d0", 1.0), Route("p1", "d1", 1.0)], kv_connector=kv_connector)
    cluster.clients = {i.worker_id: StandInWorker(i, fail_after_tokens=decode_fail.get(i.worker_id)) for i in infos}
    return cluster


async def _collect(cluster, max_tokens=4, sampling=None):
    sampling = sampling or SamplingParams(max_tokens=max_tokens)
    return [(route, out) async for route, out in cluster.generate([1, 2, 3], sampling)]


def test_failure_before_first_token_is_retried_on_another_route():
    cluster = _cluster({"d0": 0})
    retries = []
    outputs = asyncio.run(_run_with_retry_counter(cluster, retries))
    assert {route.decode_worker for route, _ in outputs} == {"d1"}
    assert [o.token_ids[0] for _, o in outputs] == [100, 101, 102, 103]
    assert retries == [1]
    assert all(w.outstanding_tokens == 0 for w in cluster.clients.values())


async def _run_with_retry_counter(cluster, retries):
    return [(r, o) async for r, o in cluster.generate([1, 2, 3], SamplingParams(max_tokens=4),
                                                       on_retry=lambda: retries.append(1))]


def test_failure_after_tokens_reached_the_client_is_not_retried_when_migration_is_off():
    cluster = _cluster({"d0": 2})
    cluster.max_migrations = 0
    with pytest.raises(WorkerUnavailable, match="d0 died"):
        asyncio.run(_collect(cluster))
    assert cluster.clients["d1"].calls == []


def test_a_stream_whose_decode_worker_dies_migrates_with_its_tokens_as_prompt():
    cluster = _cluster({"d0": 2})  # d0 streams 100, 101, then dies
    outputs = asyncio.run(_collect(cluster, sampling=SamplingParams(max_tokens=4, min_tokens=3)))
    assert [route.decode_worker for route, _ in outputs] == ["d0", "d0", "d1", "d1"]
    (prefill_call,) = cluster.clients["p1"].calls  # a new prefill rebuilds the KV of prompt + tokens so far
    (decode_call,) = cluster.clients["d1"].calls
    assert prefill_call.prompt_token_ids == decode_call.prompt_token_ids == [1, 2, 3, 100, 101]
    assert (decode_call.sampling.max_tokens, decode_call.sampling.min_tokens) == (2, 1)
    assert outputs[-1][1].finished and cluster.prompt_stats.migrated_requests == 1
    assert all(w.outstanding_tokens == 0 for w in cluster.clients.values())


def test_a_second_failure_after_the_migration_ends_the_stream():
    cluster = _cluster({"d0": 1, "d1": 1})
    with pytest.raises(WorkerUnavailable, match="d1 died"):
        asyncio.run(_collect(cluster))
    assert cluster.prompt_stats.migrated_requests == 1


def test_prefill_runs_one_token_and_decode_gets_its_handoff():
    cluster = _cluster({}, kv_connector="zmq")
    client_sampling = SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, seed=5, stop=["t1"],
                                         stop_token_ids=[7], min_tokens=2)
    outputs = asyncio.run(_collect(cluster, sampling=client_sampling))
    route = outputs[0][0]
    prefill, decode = cluster.clients[route.prefill_worker], cluster.clients[route.decode_worker]
    assert len(prefill.calls) == 1 and len(decode.calls) == 1
    assert len(outputs) == 3 and outputs[-1][1].finished
    (prefill_call,), (decode_call,) = prefill.calls, decode.calls
    # The prefill request computes the prompt and one greedy token that nothing may stop.
    sampling = prefill_call.sampling
    assert sampling.max_tokens == 1 and sampling.temperature == 0.0 and sampling.ignore_eos
    assert sampling.stop == [] and sampling.stop_token_ids == [] and sampling.min_tokens == 0
    assert sampling == PREFILL_SAMPLING
    # ... and tells its connector to ship the KV to the route's decode worker.
    sent = prefill_call.kv_transfer_params
    assert sent["do_remote_decode"] is True and sent["decode_endpoint"] == decode.info.kv_endpoint
    assert sent["decode_tp"] == decode.info.tensor_parallel_size and sent["transfer_id"]
    # Decode gets the same prompt, the client's own sampling, and the prefill's handoff.
    handoff = _handoff(prefill_call.prompt_token_ids, sent)
    assert decode_call.prompt_token_ids == prefill_call.prompt_token_ids == [1, 2, 3]
    assert decode_call.sampling == client_sampling
    assert decode_call.kv_transfer_params == handoff and handoff["transfer_id"] == sent["transfer_id"]
    received = DecodeHandoff.from_params(decode_call.kv_transfer_params)  # what decode's connector checks
    assert received.prompt_hash == prompt_hash(decode_call.prompt_token_ids) and received.num_prompt_tokens == 3
    assert decode_call.request_id != prefill_call.request_id


def test_without_a_connector_decode_recomputes():
    cluster = _cluster({}, kv_connector="none")
    route = asyncio.run(_collect(cluster, max_tokens=2))[0][0]
    (prefill_call,), (decode_call,) = cluster.clients[route.prefill_worker].calls, cluster.clients[route.decode_worker].calls
    assert prefill_call.sampling == PREFILL_SAMPLING and prefill_call.kv_transfer_params is None
    assert decode_call.kv_transfer_params is None


def test_both_routes_failing_surfaces_the_error():
    cluster = _cluster({"d0": 0, "d1": 0})
    with pytest.raises(WorkerUnavailable):
        asyncio.run(_collect(cluster))


def test_without_a_healthy_route_a_decode_worker_serves_alone():
    cluster = _cluster({})
    cluster.clients["p0"].healthy = cluster.clients["p1"].healthy = False
    outputs = asyncio.run(_collect(cluster, max_tokens=3))
    route = outputs[0][0]
    assert route.prefill_worker == route.decode_worker == "d0"  # least loaded decode worker, alone
    (call,) = cluster.clients["d0"].calls
    assert call.sampling.max_tokens == 3 and call.kv_transfer_params is None  # the client's request, no KV
    assert [t for _, o in outputs for t in o.token_ids] == [100, 101, 102]
    assert cluster.prompt_stats.degraded_requests == 1


def test_without_decode_workers_a_prefill_worker_decodes():
    cluster = _cluster({})
    cluster.clients["d0"].healthy = cluster.clients["d1"].healthy = False
    cluster.clients["p0"].outstanding_tokens = 50
    route = asyncio.run(_collect(cluster, max_tokens=2))[0][0]
    assert route == Route("p1", "p1", 1.0)
    assert cluster.clients["p1"].calls[0].sampling.max_tokens == 2


def test_a_failed_route_with_no_other_left_falls_back_to_one_worker():
    cluster = _cluster({"d0": 0})
    cluster.clients["p1"].healthy = False  # only p0->d0 is left, and d0 fails before its first token
    outputs = asyncio.run(_collect(cluster, max_tokens=2))
    assert outputs[-1][1].finished and outputs[0][0] == Route("d1", "d1", 1.0)  # d1 has no prefill left: alone
    assert cluster.prompt_stats.degraded_requests == 1


def test_no_healthy_worker_at_all_is_unavailable():
    from common.routing import NoRouteAvailable

    cluster = _cluster({})
    for client in cluster.clients.values():
        client.healthy = False
    with pytest.raises(NoRouteAvailable, match="every worker is down"):
        asyncio.run(_collect(cluster))
