"""The router as users run it: a real `python -m router serve` process (embedded
default: one prefill and one decode vLLM worker, KV over ZeroMQ), driven by the
`openai` client and httpx."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from engine.tiny_model import TINY_MODEL_NAME
from router_process import EMBEDDED_API_KEY

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "ZeroMQ carries the KV cache from the prefill worker to the decode worker. " * 4,
]


def _client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.base_url}/v1", api_key=EMBEDDED_API_KEY, max_retries=0, timeout=120)


def _reference_tokens(reference_llm, prompt_ids: list[int], max_tokens: int) -> list[int]:
    from vllm import SamplingParams

    out = reference_llm.generate([{"prompt_token_ids": prompt_ids}],
                                 SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return list(out[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_models_and_health(embedded_router):
    models = _client(embedded_router).models.list()
    assert [m.id for m in models.data] == [TINY_MODEL_NAME]
    health = httpx.get(f"{embedded_router.base_url}/health").json()
    assert health["status"] == "ok"
    assert {w["role"] for w in health["workers"].values()} == {"prefill", "decode"}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_tokens_equal_colocated_engine(embedded_router, reference_llm, tokenizer, prompt):
    prompt_ids = tokenizer.encode(prompt)
    response = _client(embedded_router).completions.create(
        model=TINY_MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = response.choices[0]
    assert choice.token_ids == _reference_tokens(reference_llm, prompt_ids, 16)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 16
    assert choice.finish_reason == "length"


def test_a_token_prompt_ending_mid_character_streams_only_new_text(embedded_router, tokenizer):
    """Like a migrated stream's prompt: the workers' detokenizer must not leak the prompt (vLLM #48853)."""
    whole_prompt = tokenizer.encode("Hello there")
    prompt = whole_prompt + tokenizer.encode("€", add_special_tokens=False)[:1]
    chunks = list(_client(embedded_router).completions.create(
        model=TINY_MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True}))
    generated = [t for c in chunks for t in c.choices[0].token_ids or []]
    streamed = "".join(c.choices[0].text for c in chunks)
    assert len(generated) == 12
    full_text = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    assert streamed == full_text[len(tokenizer.decode(whole_prompt, skip_special_tokens=True)):]


def test_streaming_completion_equals_non_streaming(embedded_router):
    client = _client(embedded_router)
    kwargs = dict(model=TINY_MODEL_NAME, prompt=PROMPTS[1], max_tokens=20, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not(embedded_router, reference_llm, tokenizer):
    client = _client(embedded_router)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does prefill do?"}]
    prompt_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    whole = client.chat.completions.create(model=TINY_MODEL_NAME, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].token_ids == _reference_tokens(reference_llm, list(prompt_ids), 12)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(model=TINY_MODEL_NAME, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_stop_string_cuts_output(embedded_router):
    client = _client(embedded_router)
    full = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = [w for w in re.findall(r"[A-Za-z]{3,}", full)]
    assert words, f"need a printable word in {full!r} to stop on"
    stop = words[len(words) // 2]
    cut = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(embedded_router):
    client = _client(embedded_router)
    kwargs = dict(model=TINY_MODEL_NAME, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=1234,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    first = client.completions.create(**kwargs).choices[0].token_ids
    second = client.completions.create(**kwargs).choices[0].token_ids
    other = client.completions.create(**{**kwargs, "seed": 99}).choices[0].token_ids
    assert first == second
    assert first != other


def test_32_concurrent_streams_complete_without_loss(embedded_router, reference_llm, tokenizer):
    client = openai.AsyncOpenAI(base_url=f"{embedded_router.base_url}/v1", api_key=EMBEDDED_API_KEY,
                                max_retries=0, timeout=300)
    prompts = [f"Request number {i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(32)]

    async def one(prompt: str) -> tuple[str, list[int]]:
        stream = await client.completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        ids, finish = [], None
        async for chunk in stream:
            ids.extend(chunk.choices[0].token_ids or [])
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        return prompt, ids

    async def run_all():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert [p for p, _ in results] == prompts  # every request answered once, none lost
    for prompt, ids in results:
        assert ids == _reference_tokens(reference_llm, tokenizer.encode(prompt), 12), prompt


def test_client_disconnect_aborts_on_workers(embedded_router):
    url = f"{embedded_router.base_url}/v1/completions"
    body = {"model": TINY_MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url, json=body, headers=embedded_router.headers, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # The router aborts the request on the decode worker long before its 900
    # tokens are done: the router's outstanding tokens and the worker's own
    # in-flight count (from its health reports) drop back to zero.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = httpx.get(f"{embedded_router.base_url}/health").json()["workers"]
        metrics = httpx.get(f"{embedded_router.base_url}/metrics").text
        inflight = [line for line in metrics.splitlines() if line.startswith("hexserve_worker_inflight_requests")]
        if all(w["outstanding_tokens"] == 0 for w in workers.values()) and inflight and all(
                line.endswith(" 0.0") for line in inflight):
            break
        time.sleep(0.2)
    assert all(w["outstanding_tokens"] == 0 for w in workers.values()), workers
    assert inflight and all(line.endswith(" 0.0") for line in inflight), inflight


def test_metrics_count_requests_and_kv_transfers(embedded_router):
    for prompt in ("metrics", "metrics, again", "and a third time"):
        _client(embedded_router).completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=4)
    time.sleep(1.5)  # workers publish their counters a few times a second; the router reads them on each ping
    text = httpx.get(f"{embedded_router.base_url}/metrics").text
    ok = re.search(r'hexserve_requests_total\{endpoint="completions",status="ok"\} (\d+)', text)
    assert ok and int(ok.group(1)) >= 1
    assert "hexserve_time_to_first_token_seconds_count" in text
    # Read when scraped: every request has finished, so none runs or waits (they used to keep the last admission's count).
    assert re.search(r"^hexserve_requests_running 0\.0$", text, re.M) and re.search(r"^hexserve_admission_waiting 0\.0$", text, re.M)
    loaded = re.search(r'hexserve_kv_transfer\{stat="transfers_loaded_ok",worker="decode-0"\} ([\d.e+]+)', text)
    assert loaded and float(loaded.group(1)) >= 1, "the decode worker must have loaded KV sent by prefill"
    failed = re.search(r'hexserve_kv_transfer\{stat="transfers_loaded_failed",worker="decode-0"\} ([\d.e+]+)', text)
    assert failed and float(failed.group(1)) == 0
    # The router forwards to decode once prefill is done, so the KV is (nearly always)
    # there already and loads in the step that admits the request.
    sync = re.search(r'hexserve_kv_transfer\{stat="transfers_loaded_sync",worker="decode-0"\} ([\d.e+]+)', text)
    assert sync and 1 <= float(sync.group(1)) <= float(loaded.group(1))


@pytest.mark.parametrize("body, headers, status, fragment", [
    (b"{not json", None, 400, "JSON decode error"),
    (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), None, 404, "does not exist"),
    (json.dumps({"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 100000}).encode(), None, 400, "max_model_len"),
    (json.dumps({"model": TINY_MODEL_NAME}).encode(), None, 400, "prompt"),
    (json.dumps({"model": TINY_MODEL_NAME, "prompt": "x", "priority": 2}).encode(), None, 400, "priority"),
    (json.dumps({"model": TINY_MODEL_NAME, "prompt": "x", "temperature": -1}).encode(), None, 400, "temperature"),
    (json.dumps({"model": TINY_MODEL_NAME, "prompt": [999999]}).encode(), None, 400, "vocabulary"),
    (json.dumps({"model": TINY_MODEL_NAME, "prompt": "x"}).encode(), {"Authorization": "Bearer wrong"}, 401, "API key"),
    (json.dumps({"model": TINY_MODEL_NAME, "prompt": "x"}).encode(), {}, 401, "API key"),
])
def test_bad_requests_get_4xx_with_message(embedded_router, body, headers, status, fragment):
    sent_headers = {"Content-Type": "application/json", **(embedded_router.headers if headers is None else headers)}
    response = httpx.post(f"{embedded_router.base_url}/v1/completions", content=body, headers=sent_headers, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_oversized_body_refused(embedded_router):
    body = json.dumps({"model": TINY_MODEL_NAME, "prompt": "x" * (5 * 1024 * 1024)})
    response = httpx.post(f"{embedded_router.base_url}/v1/completions", content=body,
                          headers={"Content-Type": "application/json", **embedded_router.headers}, timeout=30)
    assert response.status_code == 413
