"""Every field of vLLM's completion and chat request schemas is honoured or refused, never ignored."""

from __future__ import annotations

import pytest

from router.openai_schema import NOT_HONOURED, ApiError, ChatCompletionRequest, CompletionRequest
from router.prepare import ApiKind, validate_body

MODEL = "m"
SCHEMAS = {
    ApiKind.COMPLETION: ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", CompletionRequest,
                         {"model": MODEL, "prompt": "hi"}),
    ApiKind.CHAT: ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", ChatCompletionRequest,
                   {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
}


def _vllm_fields(kind: ApiKind) -> set[str]:
    import importlib

    module, name, _, _ = SCHEMAS[kind]
    return set(getattr(importlib.import_module(module), name).model_fields)


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_every_vllm_field_is_honoured_or_listed_as_refused(kind):
    ours = set(SCHEMAS[kind][2].model_fields)
    unknown = _vllm_fields(kind) - ours - set(NOT_HONOURED) - {"add_special_tokens"}
    assert not unknown, f"vLLM fields neither honoured nor refused: {sorted(unknown)}"


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_every_field_we_do_not_honour_is_refused_naming_it(kind):
    base = SCHEMAS[kind][3]
    fields = (_vllm_fields(kind) - set(SCHEMAS[kind][2].model_fields)) | {"best_of", "guided_json", "functions"}
    for field in sorted(fields):
        with pytest.raises(ApiError) as refused:
            validate_body(kind, {**base, field: {"not": "neutral"}}, MODEL)
        assert refused.value.status_code == 400 and refused.value.param == field, field
        assert field in refused.value.message


@pytest.mark.parametrize("body", [
    {"repetition_penalty": 1.0}, {"repetition_penalty": 1}, {"logit_bias": {}}, {"response_format": {"type": "text"}},
    {"skip_special_tokens": True}, {"use_beam_search": False}, {"add_special_tokens": True}, {"best_of": 1},
])
def test_values_that_change_nothing_are_accepted(body):
    validate_body(ApiKind.COMPLETION, {**SCHEMAS[ApiKind.COMPLETION][3], **body}, MODEL)


@pytest.mark.parametrize("body, field", [
    ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"logit_bias": {"50": -100}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs"), ({"best_of": 2}, "best_of"),
    ({"add_special_tokens": True}, "add_special_tokens"),  # chat tokenizes without them
])
def test_the_issues_silently_ignored_fields_are_refused(body, field):
    with pytest.raises(ApiError, match=field) as refused:
        validate_body(ApiKind.CHAT, {**SCHEMAS[ApiKind.CHAT][3], **body}, MODEL)
    assert refused.value.param == field


def test_stop_token_ids_are_honoured():
    from router.prepare import sampling_spec

    req = validate_body(ApiKind.COMPLETION, {**SCHEMAS[ApiKind.COMPLETION][3], "stop_token_ids": [7, 9]}, MODEL)
    assert sampling_spec(req, 16).stop_token_ids == [7, 9]
