"""Cache-aware routing through a real router with two prefill workers and one decode worker.

Requests that share a prefix land on the prefill worker that holds it; a
prompt whose all-but-a-short-suffix the decode worker holds skips the
prefill hop (decode-first) and answers token-equal to one engine.
"""

from __future__ import annotations

import random
import re
import time

import httpx
import pytest

from benchmarks.local_plans import write_local_plan
from engine.tiny_model import TINY_MODEL_NAME
from router_process import start_router

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_prefill_router(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("cache-aware")
    plan = write_local_plan(folder, num_prefill=2, num_decode=1)
    router = start_router(folder, "--plan", str(plan), "--model", tiny_model_dir,
                          "--served-model-name", TINY_MODEL_NAME, "--decode-first-max-tokens", "64")
    yield router
    router.stop()


def _metrics(router) -> str:
    return httpx.get(f"{router.base_url}/metrics").text


def _series(text: str, name: str) -> dict[str, float]:
    return {labels: float(value) for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}})? ([\d.e+-]+)$", text, re.M)}


def _prefill_queries(router) -> dict[str, float]:
    return {re.search(r'worker="([^"]+)"', k).group(1): v for k, v in
            _series(_metrics(router), "hexserve_worker_prefix_cache_queries_tokens").items() if "prefill" in k}


def _decode_bytes_received(router) -> float:
    found = re.search(r'hexserve_kv_transfer\{stat="bytes_received",worker="decode-d0"\} ([\d.e+]+)', _metrics(router))
    return float(found.group(1)) if found else 0.0


def _complete(router, prompt: list[int], max_tokens: int = 4) -> list[int]:
    response = httpx.post(f"{router.base_url}/v1/completions", timeout=120, json={
        "model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def _indexed(router, worker: str, min_blocks: int) -> None:
    """Wait until the router's index holds the worker's blocks (events are asynchronous)."""
    deadline = time.monotonic() + 20
    pattern = rf'hexserve_prefix_index_blocks\{{role="[a-z]+",worker="{worker}"\}} ([\d.]+)'
    while time.monotonic() < deadline:
        found = re.search(pattern, _metrics(router))
        if found and float(found.group(1)) >= min_blocks:
            return
        time.sleep(0.2)
    raise AssertionError(f"the router's index never held {min_blocks} blocks of {worker}")


def _worker_that_computed(router, before: dict[str, float]) -> str:
    time.sleep(1.5)  # the engines' counts reach the router with its next health ping (0.5 s)
    after = _prefill_queries(router)
    moved = [w for w in after if after[w] > before.get(w, 0)]
    assert len(moved) == 1, (before, after)
    return moved[0]


def test_requests_sharing_a_prefix_land_on_the_prefill_worker_that_holds_it(two_prefill_router):
    router = two_prefill_router
    rng = random.Random(5)
    homes = []
    for _pair in range(3):
        shared = [rng.randrange(10, 500) for _ in range(400)]
        before, received = _prefill_queries(router), _decode_bytes_received(router)
        _complete(router, shared + [rng.randrange(10, 500) for _ in range(200)])
        first = _worker_that_computed(router, before)
        first_bytes = _decode_bytes_received(router) - received
        _indexed(router, first, 1)
        _indexed(router, "decode-d0", 1)
        before, received = _prefill_queries(router), _decode_bytes_received(router)
        # 200 new tokens: far more than decode-first's 64, so a prefill worker computes them.
        _complete(router, shared + [rng.randrange(10, 500) for _ in range(200)])
        assert _worker_that_computed(router, before) == first
        # Decode held the shared 128-token blocks (3 of the 5): only the other 2 travelled.
        assert 0 < _decode_bytes_received(router) - received <= 0.5 * first_bytes
        homes.append(first)
    # With equal loads the first request of each prefix follows the plan's alternation.
    assert len(set(homes)) == 2, homes


def test_decode_first_skips_the_prefill_hop_and_is_token_equal(two_prefill_router, reference_llm):
    from vllm import SamplingParams

    router = two_prefill_router
    rng = random.Random(9)
    conversation = [rng.randrange(10, 500) for _ in range(520)]
    _complete(router, conversation)
    _indexed(router, "decode-d0", 4)
    time.sleep(1.5)  # the first request's counts reach the router with its next health ping
    decode_first = _series(_metrics(router), "hexserve_decode_first_requests")
    before = _prefill_queries(router)
    follow_up = conversation + [rng.randrange(10, 500) for _ in range(20)]  # the next turn: a short suffix
    tokens = _complete(router, follow_up, max_tokens=12)
    time.sleep(1.5)
    assert _series(_metrics(router), "hexserve_decode_first_requests")[""] == decode_first[""] + 1
    assert _prefill_queries(router) == before  # no prefill worker computed anything
    reference = reference_llm.generate([{"prompt_token_ids": follow_up}],
                                       SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert tokens == list(reference[0].outputs[0].token_ids)


def test_the_live_plan_can_be_read_and_reweighted(two_prefill_router, tmp_path):
    from benchmarks.local_plans import local_plan

    router = two_prefill_router
    view = httpx.get(f"{router.base_url}/plan").json()
    assert view["routing"] == "cache-aware" and view["history"][0]["source"].endswith("plan_2p1d.json")
    observed = view["observed"]  # the earlier tests' requests, in the last 60 s
    assert observed["requests"] >= 1 and observed["prompt_tokens_p50"] > 0 and observed["ttft_ms_p50"] > 0
    plan = local_plan(2, 1).to_json()
    plan["routes"][1]["rate_rps"] = 2.0
    answer = httpx.post(f"{router.base_url}/plan", json=plan)
    assert answer.status_code == 200, answer.text
    assert {(r["prefill"], r["weight"]) for r in httpx.get(f"{router.base_url}/plan").json()["routes"]} == {
        ("prefill-p0", 1.0), ("prefill-p1", 2.0)}
    assert _complete(router, [11, 12, 13]) is not None  # still serving on the new weights
