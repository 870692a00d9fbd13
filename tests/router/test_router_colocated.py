"""A colocated worker (one engine, prefill and decode in one): launched as
`python -m engine`, it reports role "colocated" in its pong and in the
router's /health, and the router sends it the client's request directly."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from common.roles import Role
from common.routing import Route
from engine.worker_spec import WorkerSpec


def test_worker_reports_colocated_in_pong_and_health(tmp_path):
    from transformers import AutoTokenizer

    from engine.config import EngineSettings
    from engine.standin import StandInEngine
    from engine.tiny_model import TINY_MODEL_NAME, build_tiny_model
    from engine.worker_server import WorkerServer
    from router.app import create_app
    from router.prepare import RouterSettings
    from router.cluster import Cluster

    spec = WorkerSpec("colocated-g0", Role.COLOCATED, f"ipc://{tmp_path}/g0-control.sock")
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model())

    async def scenario():
        server = WorkerServer(settings=EngineSettings(model="standin"), role=Role.COLOCATED, worker_id=spec.worker_id,
                              control_endpoint=spec.control_endpoint, engine_factory=StandInEngine)
        serving = asyncio.ensure_future(server.serve())
        cluster = Cluster(workers=[spec], routes=[Route(spec.worker_id, spec.worker_id, 1.0)], kv_connector="none")
        try:
            await cluster.start()
            await cluster.wait_ready(60)
            app = create_app(cluster, RouterSettings(TINY_MODEL_NAME, 1024), tokenizer)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
                health = (await client.get("/health")).json()
                answer = await client.post("/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "hi",
                                                                     "max_tokens": 3})
            return health, answer, cluster.clients[spec.worker_id].load
        finally:
            await cluster.close()
            server.stop()
            await serving

    health, answer, load = asyncio.run(scenario())
    assert load.role is Role.COLOCATED and load.worker_id == "colocated-g0"
    assert health["status"] == "ok"
    assert health["workers"] == {"colocated-g0": {"role": "colocated", "healthy": True, "outstanding_tokens": 0}}
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3


def test_colocated_worker_runs_the_bare_engine_without_kv_options():
    spec = WorkerSpec("colocated-g0", Role.COLOCATED, "ipc:///tmp/g0-control.sock")
    command = spec.command()
    assert command[1:3] == ["-m", "engine"]
    assert not [arg for arg in command if arg.startswith("--kv")]
    with pytest.raises(ValueError, match="colocated: it moves no KV"):
        WorkerSpec("colocated-g0", Role.COLOCATED, "ipc:///tmp/c.sock", kv_endpoint="ipc:///tmp/kv.sock")


@pytest.mark.slow
def test_colocated_plan_serves_with_the_bare_engine(tmp_path, tiny_model_dir, reference_llm):
    """A real router on a plan with one colocated group: its worker is `python -m
    engine`, says "colocated" in /health, and answers token-equal to one engine."""
    from openai import OpenAI
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from common.plan import GroupPlan, Plan, Predicted, StagePlan
    from engine.tiny_model import TINY_MODEL_NAME
    from router_process import start_router

    group = GroupPlan(id="c0", role="colocated", gpus=["n0:0"], gpu_types={"CPU": 1}, nodes=["n0"], region="local",
                      tp=1, pp=1, layer_partition=[4], stages=[StagePlan(node="n0", gpu_type="CPU", gpus=["n0:0"], tp=1,
                                                                          layers=[0, 4])],
                      capacity_rps=1.0, load_rps=1.0, batch=8, latency_ms=10.0, service_ms=10.0, kv_budget_ms=0.0)
    plan = Plan(mode="colocated", cluster="colocated-test", model={"name": TINY_MODEL_NAME}, workload={},
                groups=[group], routes=[], unused_gpus=[], predicted=Predicted(1.0, 100.0, 50.0, 10.0, 1.0, 1.0, 1.0, None))
    plan.write(tmp_path / "plan.json")
    router = start_router(tmp_path, "--plan", str(tmp_path / "plan.json"), "--model", tiny_model_dir,
                          "--served-model-name", TINY_MODEL_NAME)
    try:
        assert router.worker_pid("colocated")  # a `python -m engine` child
        health = httpx.get(f"{router.base_url}/health").json()
        assert health["workers"] == {"colocated-c0": {"role": "colocated", "healthy": True, "outstanding_tokens": 0}}
        prompt = "One engine computes the prompt and generates"
        response = OpenAI(base_url=f"{router.base_url}/v1", api_key="unused").completions.create(
            model=TINY_MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        reference = reference_llm.generate([{"prompt_token_ids": AutoTokenizer.from_pretrained(tiny_model_dir).encode(prompt)}],
                                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        assert response.choices[0].token_ids == list(reference[0].outputs[0].token_ids)
    finally:
        router.stop()
