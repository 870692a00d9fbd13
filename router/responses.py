"""OpenAI response shapes: one JSON body, or server-sent events ending in [DONE]."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.openai_schema import ApiError
from router.prepare import ApiKind, PreparedRequest
from router.runner import Completed, RequestRunner


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    """What every body and chunk of one response repeats."""

    response_id: str
    created: int  # unix seconds
    model: str


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def usage(prep: PreparedRequest, num_tokens: int) -> dict:
    num_prompt = len(prep.prompt_token_ids)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_tokens, "total_tokens": num_prompt + num_tokens}


def completion_body(prep: PreparedRequest, header: ResponseHeader, done: Completed) -> dict:
    """The non-streaming answer: a text_completion or a chat.completion."""
    if prep.kind is ApiKind.COMPLETION:
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
                  "finish_reason": done.finish_reason}
        obj = "chat.completion"
    if prep.return_token_ids:
        choice["token_ids"] = done.token_ids
    return {"id": header.response_id, "object": obj, "created": header.created, "model": header.model,
            "choices": [choice], "usage": usage(prep, len(done.token_ids))}


def chunk_object(prep: PreparedRequest) -> str:
    return "chat.completion.chunk" if prep.kind is ApiKind.CHAT else "text_completion"


def stream_chunk(prep: PreparedRequest, header: ResponseHeader, text: str | None, finish_reason: str | None,
                 first: bool = False, token_ids=()) -> dict:
    """One streamed chunk; for chat the first one only announces the assistant's role."""
    if prep.kind is ApiKind.CHAT:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if prep.return_token_ids and not first:
        choice["token_ids"] = list(token_ids)
    return {"id": header.response_id, "object": chunk_object(prep), "created": header.created, "model": header.model,
            "choices": [choice]}


async def stream_events(runner: RequestRunner, prep: PreparedRequest, header: ResponseHeader) -> AsyncIterator[bytes]:
    """The SSE body. A failure after the stream began ends it with an error event, then [DONE]."""
    count = 0
    try:
        if prep.kind is ApiKind.CHAT:
            yield sse(stream_chunk(prep, header, None, None, first=True))
        async with contextlib.aclosing(runner.outputs(prep)) as stream:
            async for output in stream:
                count += len(output.token_ids)
                if output.text or output.finished or (prep.return_token_ids and output.token_ids):
                    yield sse(stream_chunk(prep, header, output.text, output.finish_reason if output.finished else None,
                                           token_ids=output.token_ids))
        if prep.include_usage:
            yield sse({"id": header.response_id, "object": chunk_object(prep), "created": header.created,
                       "model": header.model, "choices": [], "usage": usage(prep, count)})
    except ApiError as exc:
        yield sse(exc.body())
    yield b"data: [DONE]\n\n"
