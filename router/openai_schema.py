"""The OpenAI API surface the router accepts, validated at the edge.

Fields we cannot honour (n > 1, logprobs, tools, structured outputs,
logit_bias, ...) are refused with a 400 that names them, rather than silently
dropped: every field of vLLM's completion and chat request schemas is either
honoured here or listed in NOT_HONOURED with the values that leave the output
unchanged (a client sending `repetition_penalty: 1.0`, as `vllm bench serve`
does, is served; `repetition_penalty: 1.2` is refused). A test walks vLLM's
schemas to keep the list complete. Fields in no schema we know are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """An error answered to the client as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status_code: int, message: str, param: str | None = None,
                 error_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.error_type = error_type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


_NEUTRAL_TOOL_CHOICE = (None, "none", "auto")  # without tools these change nothing

# vLLM request fields we do not honour -> the values that change nothing (accepted).
NOT_HONOURED: dict[str, tuple] = {
    "logit_bias": (None, {}), "repetition_penalty": (None, 1.0), "length_penalty": (None, 1.0),
    "min_p": (None, 0.0), "response_format": (None, {"type": "text"}), "structured_outputs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "best_of": (None, 1), "use_beam_search": (None, False),
    "allowed_token_ids": (None,), "bad_words": (None, []), "prompt_logprobs": (None,), "top_logprobs": (None, 0),
    "logprob_token_ids": (None,), "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "truncate_prompt_tokens": (None,), "truncation_side": (None,),
    "return_tokens_as_token_ids": (None, False), "return_token_offsets": (None, False), "cache_salt": (None,),
    "priority": (None, 0), "prompt_embeds": (None,), "kv_transfer_params": (None,), "ec_transfer_params": (None,),
    "vllm_xargs": (None,), "watermarking": (None,), "thinking_token_budget": (None,), "repetition_detection": (None,),
    "stream_interval": (None, 1), "session_id": (None,), "mm_payload": (None, "tensors"),
    "return_mm_kwargs": (None, False), "routed_experts_prompt_start": (None, 0), "request_id": (None,),
    "functions": (None,), "function_call": (None,), "echo": (None, False),
    # chat only
    "chat_template": (None,), "chat_template_kwargs": (None,), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "documents": (None,), "mm_processor_kwargs": (None,),
    "media_io_kwargs": (None,), "tool_choice": _NEUTRAL_TOOL_CHOICE, "parallel_tool_calls": (None, True, False),
    "reasoning_effort": (None,), "include_reasoning": (None, True), "return_prompt_text": (None, False),
}
# Which add_special_tokens each endpoint tokenizes with (vLLM's defaults).
_ADD_SPECIAL_TOKENS = {"completion": (None, True), "chat": (None, False)}


def refuse_not_honoured(body: dict, kind: str) -> None:
    """400 naming the first field we cannot honour at the value sent."""
    for name, value in body.items():
        neutral = _ADD_SPECIAL_TOKENS[kind] if name == "add_special_tokens" else NOT_HONOURED.get(name)
        if neutral is not None and not any(_same(value, v) for v in neutral):
            raise ApiError(400, f"{name} is not supported by this server (send it unset, or "
                                f"{_neutral_text(neutral)})", param=name)


def _same(value, neutral) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1."""
    if isinstance(value, bool) or isinstance(neutral, bool) or value is None or neutral is None:
        return value is neutral
    return value == neutral


def _neutral_text(values: tuple) -> str:
    shown = [repr(v) if not isinstance(v, dict) else str(v) for v in values if v is not None]
    return " or ".join(shown) if shown else "null"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM extension, used by load tests to fix output length
    min_tokens: int = Field(default=0, ge=0)  # vLLM extension
    logprobs: Any = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM extension: each choice carries its generated token ids

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop takes up to 16 non-empty strings")
        return stops

    def check_unsupported(self) -> None:
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported by this server", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by this server", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """One prompt (text or token ids); batches of prompts are refused."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, int) for p in prompt):
            return list(prompt)
        if len(prompt) == 1:
            return prompt[0] if isinstance(prompt[0], str) else list(prompt[0])
        raise ApiError(400, "send one prompt per request (a string or a list of token ids)", param="prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ApiError(400, f"content part of type {part.get('type')!r} is not supported; send text",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def format_validation_error(exc) -> ApiError:
    """Turn pydantic's error list into one readable message naming the field."""
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "invalid value")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return ApiError(400, f"{location}: {message}{suffix}" if location else message + suffix, param=location or None)
