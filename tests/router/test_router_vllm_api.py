"""`router serve --api vllm`: vLLM's own OpenAI server over the disaggregated cluster (issue 17).

One prefill and one decode worker of the tiny model; each answer is held
against one colocated vLLM engine of the same model (`reference_llm`), with
the `openai` client a user would use.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from engine.tiny_model import TINY_MODEL_NAME
from router_process import start_router

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, far away, a stream of tokens"
VLLM_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
LOGPROB_TOLERANCE = 1e-3  # the same weights and kernels on both sides; only the KV moved


@pytest.fixture(scope="module")
def vllm_api_router(tmp_path_factory):
    # vLLM's own flags pass through: tool calls parsed as `vllm serve --tool-call-parser hermes` would.
    router = start_router(tmp_path_factory.mktemp("vllm-api"), "--api", "vllm", "--vllm-args", " ".join(VLLM_FLAGS))
    yield router
    router.stop()


@pytest.fixture(scope="module")
def client(vllm_api_router):
    return openai.OpenAI(base_url=f"{vllm_api_router.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).encode(PROMPT)


def _reference(reference_llm, prompt_ids, **sampling):
    from vllm import SamplingParams

    return reference_llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(**sampling), use_tqdm=False)[0]


def test_logprobs_and_top_logprobs_equal_one_engine(client, reference_llm, prompt_ids):
    answer = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                       logprobs=3, extra_body={"return_token_ids": True})
    reference = _reference(reference_llm, prompt_ids, max_tokens=8, temperature=0.0, logprobs=3).outputs[0]
    choice = answer.choices[0]
    assert choice.token_ids == list(reference.token_ids)
    assert choice.logprobs.token_logprobs == pytest.approx(
        [position[token].logprob for position, token in zip(reference.logprobs, reference.token_ids)],
        abs=LOGPROB_TOLERANCE)
    for ours, theirs in zip(choice.logprobs.top_logprobs, reference.logprobs):
        assert ours == pytest.approx({e.decoded_token: e.logprob for e in theirs.values()}, abs=LOGPROB_TOLERANCE)
    chat = client.chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    first = chat.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 2 and first.logprob == pytest.approx(first.top_logprobs[0].logprob)


def test_echo_returns_the_prompt_with_its_logprobs_from_prefill(client, reference_llm, prompt_ids):
    answer = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
                                       logprobs=1, echo=True)
    reference = _reference(reference_llm, prompt_ids, max_tokens=2, temperature=0.0, logprobs=1, prompt_logprobs=1)
    choice = answer.choices[0]
    assert choice.text.startswith(PROMPT)
    expected_prompt = [None] + [position[token].logprob
                                for position, token in zip(reference.prompt_logprobs[1:], prompt_ids[1:])]
    ours = choice.logprobs.token_logprobs[:len(prompt_ids)]
    assert ours[0] is None and ours[1:] == pytest.approx(expected_prompt[1:], abs=LOGPROB_TOLERANCE)


def test_n_sequences_with_a_seed_equal_vllms(client, reference_llm, prompt_ids):
    answer = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                       n=3, seed=7, extra_body={"return_token_ids": True})
    reference = _reference(reference_llm, prompt_ids, max_tokens=8, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in answer.choices) == [0, 1, 2]
    ours = {tuple(c.token_ids) for c in answer.choices}
    assert ours == {tuple(o.token_ids) for o in reference.outputs}
    assert len(ours) > 1  # three samples, not one answer three times


_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}
# Bounded fields: a random tiny model under a grammar still has to finish within max_tokens.
_SCHEMA = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "name": {"type": "string", "maxLength": 6}},
           "required": ["count", "name"], "additionalProperties": False}
_CHAT = {"messages": [{"role": "user", "content": "weather in Paris?"}], "temperature": 0}
SAME_AS_VLLM = {
    "json_schema": dict(_CHAT, max_tokens=300, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": _SCHEMA}}),
    "json_object": dict(_CHAT, max_tokens=40, response_format={"type": "json_object"}),
    "named_tool": dict(_CHAT, max_tokens=200, tools=[_TOOL],
                       tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    "required_tool": dict(_CHAT, max_tokens=200, tools=[_TOOL], tool_choice="required"),
    "auto_tool": dict(_CHAT, max_tokens=30, tools=[_TOOL]),
    "penalties_min_p": dict(_CHAT, max_tokens=12, temperature=0.7, seed=3, repetition_penalty=1.3, min_p=0.05,
                            logit_bias={"425": 5}),
    "stop_included": dict(_CHAT, max_tokens=30, stop=[" a"], include_stop_str_in_output=True),
    "streamed": dict(_CHAT, max_tokens=8, stream=True, stream_options={"include_usage": True}, logprobs=True),
}


@pytest.fixture(scope="module")
def vllm_serve(tmp_path_factory, tiny_model_dir):
    """`vllm serve` of the same model with the same flags: what a client of vLLM gets."""
    from router_process import start_vllm_server

    server = start_vllm_server(tmp_path_factory.mktemp("vllm-serve"), tiny_model_dir, *VLLM_FLAGS)
    yield server
    server.stop()


def _answer(base_url: str, body: dict):
    """The chat answer as a client sees it, less what differs on every call (ids, clocks)."""
    body = dict(body, model=TINY_MODEL_NAME)
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        if not body.get("stream"):
            return _stable(json.loads(response.read()))
        return [_stable(json.loads(line[len("data: "):])) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in ("id", "created", "system_fingerprint")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


@pytest.mark.parametrize("name", SAME_AS_VLLM)
def test_the_same_request_gets_the_same_answer_as_from_vllm_serve(vllm_api_router, vllm_serve, name):
    ours = _answer(vllm_api_router.base_url, SAME_AS_VLLM[name])
    assert ours == _answer(vllm_serve.base_url, SAME_AS_VLLM[name])
    if name == "json_schema":  # and the answer is what was asked for
        value = json.loads(ours["choices"][0]["message"]["content"])
        assert set(value) == {"count", "name"} and isinstance(value["count"], int)
    if name == "named_tool":
        assert ours["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_batch_of_prompts_and_the_responses_api(client, reference_llm, tiny_model_dir):
    from transformers import AutoTokenizer

    prompts = [PROMPT, "The quick brown fox"]
    answer = client.completions.create(model=TINY_MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert sorted(c.index for c in answer.choices) == [0, 1]
    for choice in answer.choices:
        expected = _reference(reference_llm, tokenizer.encode(prompts[choice.index]), max_tokens=6, temperature=0.0)
        assert choice.token_ids == list(expected.outputs[0].token_ids)
    response = client.responses.create(model=TINY_MODEL_NAME, input=PROMPT, max_output_tokens=6, temperature=0)
    assert response.output_text and response.usage.output_tokens == 6
    anthropic = httpx.post(f"{client.base_url}messages", timeout=60, json={  # vLLM's Anthropic Messages API
        "model": TINY_MODEL_NAME, "max_tokens": 5, "messages": [{"role": "user", "content": PROMPT}]})
    assert anthropic.status_code == 200, anthropic.text
    assert anthropic.json()["usage"]["output_tokens"] == 5 and anthropic.json()["stop_reason"] == "max_tokens"


def test_logit_bias_keeps_a_forbidden_token_out(client):
    greedy = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True}).choices[0].token_ids
    banned = greedy[0]
    biased = client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={str(banned): -100}, extra_body={"return_token_ids": True})
    assert banned not in biased.choices[0].token_ids


def test_streamed_tokens_equal_the_whole_answer(client):
    body = dict(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=1)
    whole = client.completions.create(**body).choices[0]
    chunks = list(client.completions.create(**body, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs)


def test_tokenize_detokenize_round_trip_and_the_routers_operator_endpoints(vllm_api_router, prompt_ids):
    base = vllm_api_router.base_url
    tokens = httpx.post(f"{base}/tokenize", json={"model": TINY_MODEL_NAME, "prompt": PROMPT}).json()["tokens"]
    assert tokens == prompt_ids
    text = httpx.post(f"{base}/detokenize", json={"model": TINY_MODEL_NAME, "tokens": tokens}).json()["prompt"]
    assert text.strip() == PROMPT
    health = httpx.get(f"{base}/health").json()  # the router's, with each worker's state
    assert health["status"] == "ok" and {w["role"] for w in health["workers"].values()} == {"prefill", "decode"}
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["max_model_len"] == 1024
    metrics = httpx.get(f"{base}/metrics").text
    assert 'hexserve_requests_total{endpoint="completions",status="ok"}' in metrics
    assert "routes" in httpx.get(f"{base}/plan").json()


def test_what_the_cluster_cannot_do_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  extra_body={"cache_salt": "tenant-a"})
    with pytest.raises(openai.BadRequestError, match="priority"):
        client.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=2, extra_body={"priority": 3})
