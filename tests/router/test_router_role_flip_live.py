"""A decode worker becomes a prefill worker under load, without a restart.

`router serve --flexible-roles` starts one prefill and two decode workers,
each with a kv_both connector. While concurrent greedy completions run,
`POST /plan` flips decode-d1 to prefill: requests in flight finish where they
are (decode-d1 drains its decode requests), later ones are prefilled on
decode-d1 and their KV goes to decode-d0 (the kv_both send path), and every
answer equals one engine's tokens.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.local_plans import local_plan, write_local_plan
from engine.tiny_model import TINY_MODEL_NAME
from router_process import start_router

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
NUM_CLIENTS = 3
REQUESTS_AFTER_FLIP = 2  # each client's requests sent once the flip was applied
FLIPPED = ("decode-d1", "decode-d0")  # the route decode-d1 serves as a prefill worker


@pytest.fixture(scope="module")
def flexible_router(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("role-flip")
    plan = write_local_plan(folder, num_prefill=1, num_decode=2)
    # Round-robin: after the flip every other request goes through decode-d1 as prefill, by construction.
    router = start_router(folder, "--plan", str(plan), "--model", tiny_model_dir, "--served-model-name",
                          TINY_MODEL_NAME, "--flexible-roles", "--routing", "round-robin")
    yield router
    router.stop()


def _flipped_plan() -> dict:
    plan = local_plan(1, 2)
    plan.groups[2].role = "prefill"
    plan.routes[1].prefill, plan.routes[1].decode = "d1", "d0"
    return plan.to_json()


def _metrics(router) -> tuple[Counter, dict, float]:
    """(route picks by (prefill, decode), KV counters by (worker, stat), role flips) from /metrics."""
    picks, kv, flips = Counter(), {}, 0.0
    for family in text_string_to_metric_families(httpx.get(f"{router.base_url}/metrics").text):
        for sample in family.samples:
            if sample.name == "hexserve_route_requests_total":
                picks[(sample.labels["prefill"], sample.labels["decode"])] = sample.value
            elif sample.name == "hexserve_kv_transfer":
                kv[(sample.labels["worker"], sample.labels["stat"])] = sample.value
            elif sample.name == "hexserve_role_flips_total":
                flips = sample.value
    return picks, kv, flips


def _complete(http: httpx.Client, prompt: str) -> list[int]:
    body = {"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["token_ids"]


def _flip_once_decode_d1_is_busy(router, finished: dict) -> None:
    """Mid-load, with a decode request on decode-d1 in flight (the drain this test needs)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = httpx.get(f"{router.base_url}/health").json()["workers"]
        if len(finished) >= NUM_CLIENTS and workers["decode-d1"]["outstanding_tokens"] > 0:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"decode-d1 never had a request in flight ({len(finished)} finished)")
    answer = httpx.post(f"{router.base_url}/plan", json=_flipped_plan())
    assert answer.status_code == 200, answer.text
    assert answer.json()["changes"] == ["flip decode-d1 (group d1): decode -> prefill",
                                        "+ decode-d1->decode-d0 weight 1", "- prefill-p0->decode-d1"]


def _wait_kv_counters(router, expected: dict, timeout_s: float = 15.0) -> dict:
    """KV counters come with the workers' health replies (every 0.5 s): until they say `expected`."""
    deadline = time.monotonic() + timeout_s
    while True:
        kv = _metrics(router)[1]
        if all(kv.get(key, 0) == value for key, value in expected.items()) or time.monotonic() > deadline:
            return kv
        time.sleep(0.25)


def _prompt(i: int) -> str:
    return f"Request {i}: {i * 37} quick brown foxes jump over {i} lazy dogs, once more {i}"


def _load_with_a_flip(router) -> tuple[dict[int, list[int]], list[int]]:
    """NUM_CLIENTS clients, each sending requests one after another, and the flip mid-load: each
    client goes on until it has sent REQUESTS_AFTER_FLIP requests once the flip was applied, so that
    some requests are sent after it however fast the machine is. Each request's tokens by index
    (0, 1, ... in the order they were sent), and the indexes sent once the flip was applied."""
    finished: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    flipped, stop = threading.Event(), threading.Event()
    after_flip: list[int] = []
    indexes = itertools.count()  # next() on a count is atomic under the GIL

    def client() -> None:
        sent_after_flip = 0
        try:
            with httpx.Client(base_url=router.base_url, timeout=120) as http:
                while sent_after_flip < REQUESTS_AFTER_FLIP and not stop.is_set():
                    i = next(indexes)
                    if flipped.is_set():
                        after_flip.append(i)
                        sent_after_flip += 1
                    finished[i] = _complete(http, _prompt(i))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(NUM_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        _flip_once_decode_d1_is_busy(router, finished)
        flipped.set()
    finally:
        if not flipped.is_set():  # the flip failed: the clients stop at their next request
            stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    return finished, after_flip


def _reference_tokens(reference_llm, model_dir: str, prompts: list[str]) -> dict[int, list[int]]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    outputs = reference_llm.generate([{"prompt_token_ids": tokenizer.encode(p)} for p in prompts],
                                     SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                                     use_tqdm=False)
    return {i: list(output.outputs[0].token_ids) for i, output in enumerate(outputs)}


def test_a_decode_worker_flips_to_prefill_under_load(flexible_router, reference_llm, tiny_model_dir):
    router = flexible_router
    finished, after_flip = _load_with_a_flip(router)
    num_load = len(finished)
    assert sorted(finished) == list(range(num_load)), sorted(finished)  # every request sent completed
    assert len(after_flip) == NUM_CLIENTS * REQUESTS_AFTER_FLIP, after_flip  # and the flip came mid-load
    prompts = [_prompt(i) for i in range(num_load + 4)]
    tail = prompts[num_load:]

    # After the load: new requests alternate p0->d0 and d1->d0; none goes to decode-d1 as a decode worker.
    before, _, _ = _metrics(router)
    with httpx.Client(base_url=router.base_url, timeout=120) as http:
        finished.update({num_load + i: _complete(http, prompt) for i, prompt in enumerate(tail)})
    picks, _, flips = _metrics(router)
    assert picks - before == Counter({("prefill-p0", "decode-d0"): 2, FLIPPED: 2}), (before, picks)
    assert flips == 1.0

    # Every KV transfer went out and was loaded where the routes say, decode-d1's in both of its roles.
    kv = _wait_kv_counters(router, {
        ("prefill-p0", "transfers_sent_ok"): picks[("prefill-p0", "decode-d0")] + picks[("prefill-p0", "decode-d1")],
        ("decode-d1", "transfers_sent_ok"): picks[FLIPPED],
        ("decode-d1", "transfers_loaded_ok"): picks[("prefill-p0", "decode-d1")],
        ("decode-d0", "transfers_loaded_ok"): picks[("prefill-p0", "decode-d0")] + picks[FLIPPED],
    })
    assert picks[FLIPPED] >= 2 and picks[("prefill-p0", "decode-d1")] >= 1, picks
    assert kv[("decode-d1", "transfers_sent_ok")] == picks[FLIPPED], kv
    assert kv[("decode-d1", "transfers_loaded_ok")] == picks[("prefill-p0", "decode-d1")], kv
    assert kv[("decode-d0", "transfers_loaded_ok")] == picks[("prefill-p0", "decode-d0")] + picks[FLIPPED], kv
    assert not any(value for (_, stat), value in kv.items() if stat.endswith("failed")), kv
    view = httpx.get(f"{router.base_url}/plan").json()
    assert view["workers"]["decode-d1"] == {"role": "prefill", "healthy": True, "group": "d1", "flexible": True}

    # Greedy: every answer, before, across and after the flip, is one engine's.
    assert finished == _reference_tokens(reference_llm, tiny_model_dir, prompts)
