"""From an OpenAI request body to a typed request the cluster can run.

    JSON body ──validate (pydantic, router.openai_schema)──▶ CompletionRequest | ChatCompletionRequest
              ──model served?──▶ tokenize (chat template for chat) ──▶ fits the context?
              ──▶ PreparedRequest(prompt ids, SamplingParams, stream flags)

Every refusal is an ApiError whose message and `param` name the field (400),
the model (404), the key (401) or the size (413). Nothing here touches a
worker, so each step is testable with a tokenizer alone.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from pydantic import ValidationError
from vllm.sampling_params import SamplingParams

from router.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    format_validation_error,
    refuse_not_honoured,
)

# Prompts shorter than this are tokenized on the event loop: a thread hop costs more.
INLINE_TOKENIZE_MAX_CHARS = 4096


@dataclass(frozen=True, slots=True)
class RouterSettings:
    served_model_name: str
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    default_completion_max_tokens: int = 16


class ApiKind(str, enum.Enum):
    """Which OpenAI endpoint a request came to."""

    COMPLETION = "completion"  # POST /v1/completions
    CHAT = "chat"  # POST /v1/chat/completions

    @property
    def metrics_label(self) -> str:
        return "completions" if self is ApiKind.COMPLETION else "chat"


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request, tokenized, ready for the cluster."""

    kind: ApiKind
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool


def check_auth(authorization: str | None, api_key: str | None) -> None:
    """Refuses (401) a request whose Authorization header does not carry the key, when one is set."""
    if api_key is not None and authorization != f"Bearer {api_key}":
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       error_type="authentication_error", code="invalid_api_key")


async def read_json_body(request: Request, max_body_bytes: int) -> dict:
    """The body as a JSON object, read no further than `max_body_bytes` (413 past it)."""
    return parse_json_object(await read_limited_body(request.stream(), request.headers.get("content-length"),
                                                     max_body_bytes))


async def read_limited_body(chunks: AsyncIterator[bytes], declared: str | None, max_body_bytes: int) -> bytes:
    """A request body from its `chunks`, refused (413) once past `max_body_bytes`, or at
    once when its Content-Length (`declared`) already says so."""
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"request body of {declared} bytes exceeds the {max_body_bytes}-byte limit")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_body_bytes:
            raise ApiError(413, f"request body exceeds the {max_body_bytes}-byte limit")
    return bytes(body)


def parse_json_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def validate_body(kind: ApiKind, data: dict, served_model_name: str) -> CompletionRequest | ChatCompletionRequest:
    """The body as the endpoint's request model, for the model this router serves."""
    model_cls = CompletionRequest if kind is ApiKind.COMPLETION else ChatCompletionRequest
    try:
        req = model_cls.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc) from None
    req.check_unsupported()
    refuse_not_honoured(data, "completion" if kind is ApiKind.COMPLETION else "chat")
    if req.model != served_model_name:
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {served_model_name!r}",
                       param="model", code="model_not_found")
    return req


async def prepare_request(kind: ApiKind, data: dict, settings: RouterSettings, tokenizer) -> PreparedRequest:
    """Validate `data` (a parsed JSON body) and tokenize it; ApiError names what is wrong."""
    req = validate_body(kind, data, settings.served_model_name)
    if kind is ApiKind.COMPLETION:
        prompt = req.single_prompt()
        if isinstance(prompt, str) and len(prompt) > INLINE_TOKENIZE_MAX_CHARS:
            prompt_ids = await asyncio.to_thread(tokenize_prompt, tokenizer, prompt)
        else:
            prompt_ids = tokenize_prompt(tokenizer, prompt)
        max_tokens = req.max_tokens or settings.default_completion_max_tokens
    else:
        prompt_ids = await asyncio.to_thread(tokenize_chat, tokenizer, req)
        max_tokens = req.requested_max_tokens or (settings.max_model_len - len(prompt_ids))
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(prompt_ids) + max_tokens > settings.max_model_len:
        raise ApiError(400, f"this model's context is {settings.max_model_len} tokens; the prompt has "
                       f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more; lower max_tokens "
                       "or shorten the prompt", param="max_tokens")
    return PreparedRequest(kind, prompt_ids, sampling_spec(req, max_tokens), req.stream, req.include_usage,
                           req.return_token_ids)


def sampling_spec(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    """The client's sampling options, in vLLM's terms (what the workers run)."""
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0,
        seed=req.seed, stop=req.stop or None, stop_token_ids=list(req.stop_token_ids or []) or None,
        ignore_eos=req.ignore_eos, min_tokens=min(req.min_tokens, max_tokens),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
    )


def tokenize_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Text through the tokenizer; token ids checked against its vocabulary."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    vocab = len(tokenizer)
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    return prompt


def tokenize_chat(tokenizer, req: ChatCompletionRequest) -> list[int]:
    """The messages rendered with the model's chat template, generation prompt added."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))
    except Exception as exc:  # noqa: BLE001 - the template renders the client's input; its errors are the client's
        raise ApiError(400, f"messages could not be rendered with the chat template: {exc}", param="messages") from None
