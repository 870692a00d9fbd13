"""The request-preparation step alone: OpenAI bodies in, typed requests or 4xx naming the field out (no engines)."""

from __future__ import annotations

import asyncio

import pytest

from vllm.sampling_params import SamplingParams
from engine.tiny_model import TINY_MODEL_NAME
from router.openai_schema import ApiError
from router.prepare import (
    ApiKind,
    PreparedRequest,
    RouterSettings,
    check_auth,
    parse_json_object,
    prepare_request,
)

SETTINGS = RouterSettings(served_model_name=TINY_MODEL_NAME, max_model_len=64)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _prepare(tokenizer, body: dict, kind: ApiKind = ApiKind.COMPLETION) -> PreparedRequest:
    return asyncio.run(prepare_request(kind, {"model": TINY_MODEL_NAME, **body}, SETTINGS, tokenizer))


def _refusal(tokenizer, body: dict, kind: ApiKind = ApiKind.COMPLETION) -> ApiError:
    with pytest.raises(ApiError) as caught:
        _prepare(tokenizer, body, kind)
    return caught.value


def test_completion_body_becomes_tokens_and_sampling(tokenizer):
    prep = _prepare(tokenizer, {"prompt": "Hello, world!", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                                "top_k": 7, "seed": 3, "stop": "\n", "ignore_eos": True, "min_tokens": 9,
                                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True})
    assert prep.kind is ApiKind.COMPLETION
    assert prep.prompt_token_ids == tokenizer.encode("Hello, world!", add_special_tokens=True)
    assert prep.sampling == SamplingParams(max_tokens=5, temperature=0.5, top_p=0.9, top_k=7, seed=3, stop=["\n"],
                                         ignore_eos=True, min_tokens=5)  # min_tokens clipped to max_tokens
    assert (prep.stream, prep.include_usage, prep.return_token_ids) == (True, True, True)


def test_completion_defaults_and_token_id_prompts(tokenizer):
    prep = _prepare(tokenizer, {"prompt": [5, 6, 7]})
    assert prep.prompt_token_ids == [5, 6, 7]
    assert prep.sampling == SamplingParams(max_tokens=SETTINGS.default_completion_max_tokens)
    assert (prep.stream, prep.include_usage, prep.return_token_ids) == (False, False, False)
    assert _prepare(tokenizer, {"prompt": [[5, 6]]}).prompt_token_ids == [5, 6]  # a batch of one


def test_chat_body_uses_the_template_and_fills_the_context(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What does "}, {"type": "text", "text": "prefill do?"}]}]
    prep = _prepare(tokenizer, {"messages": messages}, ApiKind.CHAT)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does prefill do?"}],
        tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prep.kind is ApiKind.CHAT and prep.prompt_token_ids == list(expected)
    assert prep.sampling.max_tokens == SETTINGS.max_model_len - len(expected)
    assert _prepare(tokenizer, {"messages": messages, "max_completion_tokens": 4}, ApiKind.CHAT).sampling.max_tokens == 4


@pytest.mark.parametrize("body, status, param, fragment", [
    ({}, 400, "prompt", "Field required"),
    ({"prompt": "x", "n": 2}, 400, "n", "only n=1"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal"),
    ({"prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "context is 64 tokens"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ({"prompt": [999999]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ({"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model", "does not exist"),
])
def test_bad_completion_bodies_name_the_field(tokenizer, body, status, param, fragment):
    error = _refusal(tokenizer, body)
    assert (error.status_code, error.param) == (status, param)
    assert fragment in error.message


@pytest.mark.parametrize("body, param, fragment", [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Input should be"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "send text"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
])
def test_bad_chat_bodies_name_the_field(tokenizer, body, param, fragment):
    error = _refusal(tokenizer, body, ApiKind.CHAT)
    assert (error.status_code, error.param) == (400, param)
    assert fragment in error.message


def test_body_must_be_a_json_object():
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    for body, fragment in ((b"{nope", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff", "not valid JSON")):
        with pytest.raises(ApiError, match=fragment) as caught:
            parse_json_object(body)
        assert caught.value.status_code == 400


def test_api_key_is_checked_when_set():
    check_auth(None, None)
    check_auth("Bearer k", "k")
    for header in (None, "Bearer wrong", "k"):
        with pytest.raises(ApiError, match="API key") as caught:
            check_auth(header, "k")
        assert caught.value.status_code == 401
