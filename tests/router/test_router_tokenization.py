"""/tokenize, /detokenize and /version on the router's own tokenizer (no worker involved)."""

from __future__ import annotations


import pytest
from asgi_client import caller

from common.roles import Role
from common.routing import Route
from engine.worker_spec import WorkerSpec


@pytest.fixture(scope="module")
def call(tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.tiny_model import TINY_MODEL_NAME
    from router.app import create_app
    from router.cluster import Cluster
    from router.prepare import RouterSettings

    spec = WorkerSpec("w", Role.COLOCATED, "ipc:///tmp/hexserve-unused.sock")
    cluster = Cluster(workers=[spec], routes=[Route("w", "w", 1.0)], kv_connector="none")
    app = create_app(cluster, RouterSettings(TINY_MODEL_NAME, 1024, api_key="k"), AutoTokenizer.from_pretrained(tiny_model_dir))
    return caller(app)


def test_tokenize_detokenize_round_trip(call, tiny_model_dir):
    from transformers import AutoTokenizer

    text = "The router tokenizes this sentence."
    answer = call("POST", "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert answer["tokens"] == AutoTokenizer.from_pretrained(tiny_model_dir).encode(text)
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 1024
    assert len(answer["token_strs"]) == answer["count"]
    back = call("POST", "/detokenize", {"tokens": answer["tokens"]}).json()["prompt"]
    assert back.endswith(text)


def test_tokenize_messages_as_a_chat_request_is_rendered(call, tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.tiny_model import TINY_MODEL_NAME
    from router.openai_schema import ChatCompletionRequest
    from router.prepare import tokenize_chat

    messages = [{"role": "user", "content": "hello there"}]
    answer = call("POST", "/tokenize", {"model": TINY_MODEL_NAME, "messages": messages}).json()
    expected = tokenize_chat(AutoTokenizer.from_pretrained(tiny_model_dir),
                             ChatCompletionRequest(model=TINY_MODEL_NAME, messages=messages))
    assert answer["tokens"] == expected


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": "x", "truncate_prompt_tokens": 3}, 400, "truncate_prompt_tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
])
def test_bad_input_is_refused_naming_the_field(call, path, body, status, param):
    response = call("POST", path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_open_like_vllms_and_version(call):
    # vLLM's API key guards /v1/... only; `vllm bench serve` tokenizes without one.
    assert call("POST", "/tokenize", {"prompt": "x"}, key=None).status_code == 200
    assert call("POST", "/v1/completions", {"model": "m", "prompt": "x"}, key=None).status_code == 401
    version = call("GET", "/version").json()
    assert version["version"] and version["hexserve"]
