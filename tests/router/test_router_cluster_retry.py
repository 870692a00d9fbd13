"""Cluster-level retry and routing with stand-in workers (the real-process tests prove the rest)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from common.roles import Role
from engine import control_protocol as proto
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
    calls: list = field(default_factory=list)

    @property
    def worker_id(self):
        return self.info.worker_id

    async def generate(self, request_id, prompt_token_ids, sampling, kv_transfer_params=None):
        self.calls.append((request_id, kv_transfer_params))
        for i in range(sampling.max_tokens):
            if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                raise WorkerUnavailable(f"{self.worker_id} died")
            await asyncio.sleep(0)
            last = i == sampling.max_tokens - 1
            yield proto.Output(version=1, request_id=request_id, token_ids=[100 + i], text=f"t{i}", finished=last,
                               finish_reason="length" if last else None,
                               kv_transfer_params={"do_remote_prefill": True} if last else None)


def _cluster(decode_fail: dict[str, int | None]) -> Cluster:
    infos = [WorkerSpec("p0", Role.PREFILL, "tcp://x:1"), WorkerSpec("p1", Role.PREFILL, "tcp://x:2"),
             WorkerSpec("d0", Role.DECODE, "tcp://x:3", "tcp://x:13"), WorkerSpec("d1", Role.DECODE, "tcp://x:4", "tcp://x:14")]
    cluster = Cluster(workers=infos, routes=[Route("p0", "d0", 1.0), Route("p1", "d1", 1.0)], kv_connector="none")
    cluster.clients = {i.worker_id: StandInWorker(i, fail_after_tokens=decode_fail.get(i.worker_id)) for i in infos}
    return cluster


async def _collect(cluster, max_tokens=4):
    return [(route, out) async for route, out in cluster.generate([1, 2, 3], proto.SamplingSpec(max_tokens=max_tokens))]


def test_failure_before_first_token_is_retried_on_another_route():
    cluster = _cluster({"d0": 0})
    retries = []
    outputs = asyncio.run(_run_with_retry_counter(cluster, retries))
    assert {route.decode_worker for route, _ in outputs} == {"d1"}
    assert [o.token_ids[0] for _, o in outputs] == [100, 101, 102, 103]
    assert retries == [1]
    assert all(w.outstanding_tokens == 0 for w in cluster.clients.values())


async def _run_with_retry_counter(cluster, retries):
    return [(r, o) async for r, o in cluster.generate([1, 2, 3], proto.SamplingSpec(max_tokens=4),
                                                       on_retry=lambda: retries.append(1))]


def test_failure_after_tokens_reached_the_client_is_not_retried():
    cluster = _cluster({"d0": 2})
    with pytest.raises(WorkerUnavailable, match="d0 died"):
        asyncio.run(_collect(cluster))
    assert cluster.clients["d1"].calls == []


def test_prefill_runs_one_token_and_decode_gets_its_handoff():
    cluster = _cluster({})
    outputs = asyncio.run(_collect(cluster, max_tokens=3))
    route = outputs[0][0]
    prefill, decode = cluster.clients[route.prefill_worker], cluster.clients[route.decode_worker]
    assert len(prefill.calls) == 1 and len(decode.calls) == 1
    assert len(outputs) == 3 and outputs[-1][1].finished


def test_both_routes_failing_surfaces_the_error():
    cluster = _cluster({"d0": 0, "d1": 0})
    with pytest.raises(WorkerUnavailable):
        asyncio.run(_collect(cluster))
