"""The OpenAI API surface the router accepts, validated at the edge.

Unknown fields are ignored (clients send many we do not act on); fields we
cannot honour (n > 1, logprobs, tools, ...) are refused with a 400 that names
them, rather than silently dropped.
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
