"""The router's HTTP face: OpenAI-compatible completions and chat, models, health, metrics.

Per request: authenticate → parse and validate (4xx with the field named) →
tokenize (chat template for chat) → admission (429 when full) → cluster
(prefill on one worker, decode on another) → SSE stream or one JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from engine import control_protocol as proto
from router.admission import Admission, AdmissionRejected
from router.cluster import Cluster
from router.metrics import RouterMetrics
from router.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    format_validation_error,
)
from common.routing import NoRouteAvailable
from router.worker_client import WorkerUnavailable

log = logging.getLogger(__name__)

# Prompts shorter than this are tokenized on the event loop: a thread hop costs more.
INLINE_TOKENIZE_MAX_CHARS = 4096


@dataclass(slots=True)
class RouterSettings:
    served_model_name: str
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    default_completion_max_tokens: int = 16


@dataclass(slots=True)
class _Prepared:
    """A validated request, tokenized, ready for the cluster."""

    kind: str  # "completion" | "chat"
    prompt_token_ids: list[int]
    sampling: proto.SamplingSpec
    stream: bool
    include_usage: bool
    return_token_ids: bool


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def create_app(cluster: Cluster, settings: RouterSettings, tokenizer, admission: Admission | None = None,
               metrics: RouterMetrics | None = None) -> FastAPI:
    app = FastAPI(title="hexserve router", docs_url=None, redoc_url=None)
    admission = admission or Admission()
    metrics = metrics or RouterMetrics()
    app.state.cluster, app.state.metrics, app.state.admission = cluster, metrics, admission

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status_code)

    def _check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {settings.api_key}":
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           error_type="authentication_error", code="invalid_api_key")

    async def _read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes exceeds the {settings.max_body_bytes}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"request body exceeds the {settings.max_body_bytes}-byte limit")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def _tokenize_prompt(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return tokenizer.encode(prompt, add_special_tokens=True)
        vocab = len(tokenizer)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        return prompt

    def _tokenize_chat(req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                      return_dict=False))
        except Exception as exc:  # noqa: BLE001 - template errors are the client's input
            raise ApiError(400, f"messages could not be rendered with the chat template: {exc}", param="messages") from None

    async def _prepare(request: Request, kind: str) -> _Prepared:
        _check_auth(request)
        data = await _read_json(request)
        model_cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
        try:
            req = model_cls.model_validate(data)
        except ValidationError as exc:
            raise format_validation_error(exc) from None
        req.check_unsupported()
        if req.model != settings.served_model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {settings.served_model_name!r}",
                           param="model", code="model_not_found")
        if kind == "completion":
            prompt = req.single_prompt()
            if isinstance(prompt, str) and len(prompt) > INLINE_TOKENIZE_MAX_CHARS:
                prompt_ids = await asyncio.to_thread(_tokenize_prompt, prompt)
            else:
                prompt_ids = _tokenize_prompt(prompt)
            max_tokens = req.max_tokens or settings.default_completion_max_tokens
        else:
            prompt_ids = await asyncio.to_thread(_tokenize_chat, req)
            max_tokens = req.requested_max_tokens or (settings.max_model_len - len(prompt_ids))
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) + max_tokens > settings.max_model_len:
            raise ApiError(400, f"this model's context is {settings.max_model_len} tokens; the prompt has "
                           f"{len(prompt_ids)} and max_tokens asks for {max_tokens} more; lower max_tokens "
                           "or shorten the prompt", param="max_tokens")
        sampling = proto.SamplingSpec(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0,
            seed=req.seed, stop=req.stop or [], ignore_eos=req.ignore_eos, min_tokens=min(req.min_tokens, max_tokens),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        )
        return _Prepared(kind, prompt_ids, sampling, req.stream, req.include_usage, req.return_token_ids)

    async def _outputs(prep: _Prepared, endpoint: str) -> AsyncIterator[proto.Output]:
        """The cluster's output deltas, with metrics; maps worker failures to API errors."""
        started = time.perf_counter()
        first_token_at = None
        num_tokens = 0
        status = "error"
        try:
            async with admission.slot():
                metrics.queue_waiting.set(admission.waiting)
                metrics.running.set(admission.running)
                async with contextlib.aclosing(cluster.generate(prep.prompt_token_ids, prep.sampling,
                                                                on_retry=metrics.retries.inc)) as stream:
                    async for route, output in stream:
                        if output.token_ids:
                            if first_token_at is None:
                                first_token_at = time.perf_counter()
                                metrics.ttft.observe(first_token_at - started)
                                metrics.route_picks.labels(route.prefill_worker, route.decode_worker).inc()
                            num_tokens += len(output.token_ids)
                        yield output
            status = "ok"
        except AdmissionRejected as exc:
            status = "rejected"
            raise ApiError(429, str(exc), error_type="rate_limit_error") from None
        except (WorkerUnavailable, NoRouteAvailable) as exc:
            raise ApiError(503, f"the request failed because a worker is unavailable: {exc}",
                           error_type="service_unavailable") from None
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            metrics.requests.labels(endpoint, status).inc()
            metrics.prompt_tokens.inc(len(prep.prompt_token_ids))
            metrics.generation_tokens.inc(num_tokens)
            if status == "ok":
                finished_at = time.perf_counter()
                metrics.e2e.observe(finished_at - started)
                if first_token_at is not None and num_tokens > 1:
                    metrics.tpot.observe((finished_at - first_token_at) / (num_tokens - 1))

    def _usage(prep: _Prepared, num_tokens: int) -> dict:
        num_prompt = len(prep.prompt_token_ids)
        return {"prompt_tokens": num_prompt, "completion_tokens": num_tokens, "total_tokens": num_prompt + num_tokens}

    async def _respond(request: Request, prep: _Prepared, endpoint: str):
        response_id = ("cmpl-" if prep.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        created = int(time.time())
        model = settings.served_model_name
        if admission.is_full():
            metrics.requests.labels(endpoint, "rejected").inc()
            raise ApiError(429, "the server is at capacity; retry later", error_type="rate_limit_error")
        if prep.stream:
            return StreamingResponse(_stream(prep, endpoint, response_id, created, model),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(_collect(prep, endpoint))
        disconnect = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if not collect.done():  # the client went away: free the request's KV on the workers
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect
            return Response(status_code=499)
        text, token_ids, finish_reason = collect.result()
        token_count = len(token_ids)
        if prep.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "chat.completion"
        if prep.return_token_ids:
            choice["token_ids"] = token_ids
        return JSONResponse({"id": response_id, "object": obj, "created": created, "model": model,
                             "choices": [choice], "usage": _usage(prep, token_count)})

    async def _client_gone(request: Request) -> None:
        """Returns when the client disconnects (the body has been read, so only that message is left)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _collect(prep: _Prepared, endpoint: str) -> tuple[str, list[int], str | None]:
        for attempt in range(2):
            parts, token_ids, reason = [], [], None
            try:
                async with contextlib.aclosing(_outputs(prep, endpoint)) as stream:
                    async for output in stream:
                        parts.append(output.text)
                        token_ids.extend(output.token_ids)
                        reason = output.finish_reason or reason
                return "".join(parts), token_ids, reason
            except ApiError as exc:
                # Nothing reached the client yet: a mid-generation worker failure
                # is retried from the start once (cluster.generate already
                # retried a failure that happened before the first token).
                if exc.status_code != 503 or attempt == 1 or not token_ids:
                    raise
                metrics.retries.inc()
        raise AssertionError("unreachable")

    async def _stream(prep: _Prepared, endpoint: str, response_id: str, created: int, model: str):
        count, chat = 0, prep.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None, first: bool = False, token_ids=()) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            if prep.return_token_ids and not first:
                choice["token_ids"] = list(token_ids)
            return {"id": response_id, "object": obj, "created": created, "model": model, "choices": [choice]}

        try:
            if chat:
                yield _sse(chunk(None, None, first=True))
            async with contextlib.aclosing(_outputs(prep, endpoint)) as stream:
                async for output in stream:
                    count += len(output.token_ids)
                    if output.text or output.finished or (prep.return_token_ids and output.token_ids):
                        yield _sse(chunk(output.text, output.finish_reason if output.finished else None,
                                         token_ids=output.token_ids))
            if prep.include_usage:
                yield _sse({"id": response_id, "object": obj, "created": created, "model": model,
                            "choices": [], "usage": _usage(prep, count)})
        except ApiError as exc:
            yield _sse(exc.body())
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _respond(request, await _prepare(request, "completion"), "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _respond(request, await _prepare(request, "chat"), "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(request)
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "hexserve",
            "max_model_len": settings.max_model_len}]}

    @app.get("/health")
    async def health():
        workers = {c.worker_id: {"role": c.info.role, "healthy": c.healthy,
                                 "outstanding_tokens": c.outstanding_tokens} for c in cluster.clients.values()}
        ok = cluster.any_route_healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "workers": workers},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.observe_workers(cluster.clients.values())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
