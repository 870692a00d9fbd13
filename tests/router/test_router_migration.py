"""A decode worker dies mid-stream and the stream goes on: one prefill and two decode workers.

The tokens streamed so far join the prompt, another route rebuilds the KV and
the stream continues where it stopped; the client sees one uninterrupted
stream whose greedy tokens equal one engine's.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from benchmarks.local_plans import write_local_plan
from engine.tiny_model import TINY_MODEL_NAME
from router_process import start_router

pytestmark = pytest.mark.slow

# Long enough that the stream is still generating when the client has read its first tokens, even
# on a loaded machine (at 300, a slow client once read token 20 after the router had finished).
MAX_TOKENS = 600


@pytest.fixture(scope="module")
def two_decode_router(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("migration")
    plan = write_local_plan(folder, num_prefill=1, num_decode=2)
    router = start_router(folder, "--plan", str(plan), "--model", tiny_model_dir, "--served-model-name", TINY_MODEL_NAME)
    yield router
    router.stop()


def _worker_pid(router, worker_id: str) -> int:
    found = router.worker_processes(worker_id)
    if not found:
        raise LookupError(worker_id)
    return found[0].pid


def _busy_decode_worker(router) -> str:
    workers = httpx.get(f"{router.base_url}/health").json()["workers"]
    busy = [w for w, s in workers.items() if s["role"] == "decode" and s["outstanding_tokens"] > 0]
    assert len(busy) == 1, workers
    return busy[0]


def test_a_stream_whose_decode_worker_dies_continues_token_equal(two_decode_router, reference_llm):
    from vllm import SamplingParams

    router = two_decode_router
    prompt = "Once upon a time, far away, a stream of tokens"
    body = {"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    tokens, texts, errors, killed = [], [], [], None
    with httpx.stream("POST", f"{router.base_url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                errors.append(event)
                continue
            choice = event["choices"][0]
            tokens += choice.get("token_ids", [])
            texts.append(choice["text"])
            if killed is None and len(tokens) >= 5:
                killed = _busy_decode_worker(router)
                os.killpg(_worker_pid(router, killed), signal.SIGKILL)
    assert killed is not None and not errors, errors
    reference = reference_llm.generate([{"prompt_token_ids": _prompt_ids(prompt)}],
                                       SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                                       use_tqdm=False)[0].outputs[0]
    assert tokens == list(reference.token_ids)
    assert "".join(texts) == reference.text
    metrics = httpx.get(f"{router.base_url}/metrics").text
    assert "hexserve_migrated_requests 1.0" in metrics
    # The other decode worker carried the rest; the killed one is restarted in the background.
    time.sleep(0.1)


def _prompt_ids(prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    from engine.tiny_model import build_tiny_model

    return AutoTokenizer.from_pretrained(build_tiny_model()).encode(prompt)
