"""A plan with pipelined prefill and decode groups, served by a real router with KV transfer.

Prefill runs the tiny model's 4 layers in stages of 1 + 3, decode in 3 + 1
(the planner splits layers unevenly, so the two sides rarely agree). The
router passes decode's split to prefill; every prefill stage sends each
decode stage the layers it holds. Tokens must equal one colocated engine's.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from engine.tiny_model import TINY_MODEL_NAME
from common.plan import GroupPlan, Plan, Predicted, RoutePlan, StagePlan
from router_process import start_router

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time " * 30, "1 2 3 4 5 6 7 8"]


def _group(group_id: str, role: str, layers: list[int]) -> GroupPlan:
    gpus = [f"n0:{group_id}{s}" for s in range(len(layers))]
    starts = [sum(layers[:s]) for s in range(len(layers))]
    stages = [StagePlan(node="n0", gpu_type="CPU", gpus=[gpu], tp=1, layers=[start, start + n])
              for gpu, start, n in zip(gpus, starts, layers)]
    return GroupPlan(id=group_id, role=role, gpus=gpus, gpu_types={"CPU": len(gpus)}, nodes=["n0"], region="local",
                     tp=1, pp=len(layers), layer_partition=layers, stages=stages, capacity_rps=1.0, load_rps=1.0,
                     batch=8, latency_ms=10.0, service_ms=10.0, kv_budget_ms=5.0)


@pytest.fixture(scope="module")
def pipelined_router(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("pp-router")
    plan = Plan(mode="disaggregated", cluster="pp-test", model={"name": TINY_MODEL_NAME}, workload={},
                groups=[_group("p0", "prefill", [1, 3]), _group("d0", "decode", [3, 1])],
                routes=[RoutePlan(prefill="p0", decode="d0", weight=1.0, rate_rps=1.0, kv_gb_per_s=1.0, transfer_ms=1.0)],
                unused_gpus=[], predicted=Predicted(1.0, 100.0, 50.0, 10.0, 1.0, 1.0, 1.0, None))
    plan.write(folder / "plan.json")
    router = start_router(folder, "--plan", str(folder / "plan.json"), "--model", tiny_model_dir,
                          "--served-model-name", TINY_MODEL_NAME)
    yield router
    router.stop()


def test_pipelined_plan_serves_token_equal_with_kv_moved_by_stage(pipelined_router, reference_llm, tiny_model_dir):
    from openai import OpenAI
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = OpenAI(base_url=f"{pipelined_router.base_url}/v1", api_key="unused")
    for prompt in PROMPTS:
        response = client.completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
        reference = reference_llm.generate([{"prompt_token_ids": tokenizer.encode(prompt)}],
                                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        assert response.choices[0].token_ids == list(reference[0].outputs[0].token_ids), prompt
    # Prefill stage 0 sends decode stage 0 one part; stage 1 sends both decode
    # stages one; both decode stages load. None recomputed. (Workers report
    # their counters, summed over ranks, with each health ping.)
    want = {("prefill-p0", "transfers_sent_ok"): 3 * len(PROMPTS), ("decode-d0", "transfers_loaded_ok"): 2 * len(PROMPTS),
            ("decode-d0", "transfers_loaded_failed"): 0, ("prefill-p0", "transfers_sent_failed"): 0}
    deadline = time.monotonic() + 15
    while True:
        metrics = httpx.get(f"{pipelined_router.base_url}/metrics").text
        got = {key: _counter(metrics, *key) for key in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want


def _counter(metrics: str, worker: str, stat: str) -> float:
    match = re.search(rf'hexserve_kv_transfer\{{stat="{stat}",worker="{worker}"\}} ([\d.e+]+)', metrics)
    return float(match.group(1)) if match else -1.0


def test_workers_remove_their_counters_folders_when_they_stop(pipelined_router):
    # Runs last in this module: it stops the router. Each worker's connector
    # counters (every pipeline rank and the scheduler side) sit in a folder of
    # its own, named by the worker's pid, in the folder the router's launcher
    # gave that worker (router.launch_local.kv_stats_folder); before, they
    # stayed in the temp dir.
    from router.launch_local import socket_root

    pids = [pipelined_router.worker_pid(role) for role in ("prefill", "decode")]
    folders = [f for pid in pids for f in socket_root().glob(f"*/*-kvstats/hexserve-kvstats-*-{pid}-*")]
    assert len(folders) == 2 and all(len(list(f.iterdir())) >= 2 for f in folders)
    pipelined_router.stop()
    assert [f for f in folders if f.exists()] == []
