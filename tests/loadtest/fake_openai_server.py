"""A small OpenAI-compatible streaming server for the harness's own tests.

It answers /v1/models and /v1/completions (streaming SSE only), sleeping
`ttft_s` before the first token and `itl_s` between tokens, and emits exactly
`max_tokens` tokens (minus `short_by`). It records every request body so tests
can check what the harness sent. Every `fail_every`-th request gets a 503.
GET /metrics answers `metrics_text(cfg)` as a Prometheus exposition, or 404
when `metrics_text` is None (like an endpoint that exports nothing).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from threaded_server import ThreadedServer

MODEL = "fake-model"


@dataclass
class FakeConfig:
    ttft_s: float = 0.02
    itl_s: float = 0.005
    usage_stats: bool = True
    short_by: int = 0
    fail_every: int = 0
    bodies: list = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    metrics_text: Callable[["FakeConfig"], str] | None = None
    token_text: str = " t{i}"  # each token's text; {i}: its index
    ensure_ascii: bool = True  # False: non-ASCII text raw in the JSON, as vLLM's pydantic models write it


def make_app(cfg: FakeConfig) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        if cfg.metrics_text is None:
            return PlainTextResponse("not found", status_code=404)
        return PlainTextResponse(cfg.metrics_text(cfg), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        cfg.bodies.append(body)
        if cfg.fail_every and len(cfg.bodies) % cfg.fail_every == 0:
            return JSONResponse({"error": {"message": "overloaded", "code": 503}}, status_code=503)
        n = max(0, int(body.get("max_tokens", 16)) - cfg.short_by)
        prompt = body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())

        async def stream():
            cfg.in_flight += 1
            cfg.peak_in_flight = max(cfg.peak_in_flight, cfg.in_flight)
            try:
                await asyncio.sleep(cfg.ttft_s)
                for i in range(n):
                    if i:
                        await asyncio.sleep(cfg.itl_s)
                    chunk = {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()),
                             "model": MODEL, "choices": [{"index": 0, "text": cfg.token_text.format(i=i),
                                                          "finish_reason": "length" if i == n - 1 else None}]}
                    if cfg.usage_stats:
                        chunk["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": i + 1,
                                          "total_tokens": n_prompt + i + 1}
                    yield f"data: {json.dumps(chunk, ensure_ascii=cfg.ensure_ascii)}\n\n"
                if cfg.usage_stats:
                    final = {"id": "cmpl-1", "choices": [], "usage": {
                        "prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}}
                    yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cfg.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class FakeServer(ThreadedServer):
    """The fake app, served on a free 127.0.0.1 port in a thread; a context manager."""

    def __init__(self, cfg: FakeConfig | None = None) -> None:
        self.cfg = cfg or FakeConfig()
        super().__init__(make_app(self.cfg))
