"""The router's HTTP face: OpenAI-compatible completions and chat, models, health, metrics.

Per request: authenticate → parse and validate (4xx with the field named) →
tokenize (chat template for chat) → admission (429 when full) → cluster
(prefill on one worker, decode on another) → SSE stream or one JSON body.

    router.prepare    body → PreparedRequest (validation, tokenization)
    router.runner     PreparedRequest → output deltas (admission, metrics, retries)
    router.responses  deltas → OpenAI JSON or SSE
    here              the endpoints, and the state they share (on app.state.router)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.admission import Admission
from router.cluster import Cluster
from router.live_plan import LivePlan
from router.metrics import RouterMetrics
from router.openai_schema import ApiError
from router.plan_changes import PlanChanges
from router.prepare import ApiKind, RouterSettings, check_auth, prepare_request, read_json_body
from router.responses import ResponseHeader, completion_body, stream_events
from router import tokenization
from router.runner import RequestRunner


@dataclass(slots=True)
class RouterState:
    """Everything the endpoints share: one per app, no module globals."""

    settings: RouterSettings
    tokenizer: object
    cluster: Cluster
    admission: Admission
    metrics: RouterMetrics
    runner: RequestRunner
    live_plan: LivePlan


def create_app(cluster: Cluster, settings: RouterSettings, tokenizer, admission: Admission | None = None,
               metrics: RouterMetrics | None = None, plan_source: str = "embedded default",
               plan_changes: PlanChanges | None = None) -> FastAPI:
    """The router's app. plan_changes: how POST /plan starts and retires workers (the
    router's launcher; give it the same `metrics`); None: only route weights and role
    flips change live."""
    app = FastAPI(title="hexserve router", docs_url=None, redoc_url=None)
    admission = admission or Admission()
    metrics = metrics or RouterMetrics()
    runner = RequestRunner(cluster, admission, metrics)
    app.state.router = RouterState(settings, tokenizer, cluster, admission, metrics, runner,
                                   LivePlan(cluster, plan_source, runner.window, plan_changes, metrics))
    app.add_exception_handler(ApiError, api_error)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"])
    app.add_api_route("/tokenize", tokenize_endpoint, methods=["POST"])
    app.add_api_route("/detokenize", detokenize_endpoint, methods=["POST"])
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/plan", get_plan, methods=["GET"])
    app.add_api_route("/plan", post_plan, methods=["POST"])
    return app


def _state(request: Request) -> RouterState:
    return request.app.state.router


async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code)


async def completions(request: Request) -> Response:
    return await _serve(request, ApiKind.COMPLETION)


async def chat_completions(request: Request) -> Response:
    return await _serve(request, ApiKind.CHAT)


async def models(request: Request) -> dict:
    settings = _state(request).settings
    check_auth(request.headers.get("authorization"), settings.api_key)
    return {"object": "list", "data": [{
        "id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "hexserve",
        "max_model_len": settings.max_model_len}]}


async def health(request: Request) -> JSONResponse:
    """Each worker's role (prefill, decode or colocated), health and the router's outstanding tokens on it;
    200 while requests can be served (status "ok", or "degraded" when only single workers can), else 503."""
    cluster = _state(request).cluster
    workers = {c.worker_id: {"role": c.info.role.value, "healthy": c.healthy,
                             "outstanding_tokens": c.outstanding_tokens} for c in cluster.clients.values()}
    status = serving_status(cluster)
    return JSONResponse({"status": status, "workers": workers}, status_code=503 if status == "unavailable" else 200)


def serving_status(cluster: Cluster) -> str:
    """ok; "degraded": no prefill->decode route, but workers that can serve requests alone; or unavailable."""
    if cluster.any_route_healthy():
        return "ok"
    if any(c.healthy for c in cluster.clients.values()):
        return "degraded"
    return "unavailable"


async def tokenize_endpoint(request: Request) -> JSONResponse:
    # Open like vLLM's: its API key guards /v1/... only (vllm/entrypoints/serve/middleware/
    # authenticate.py, GUARDED_PREFIX), and `vllm bench serve` calls /tokenize without one.
    state = _state(request)
    data = await read_json_body(request, state.settings.max_body_bytes)
    return JSONResponse(await asyncio.to_thread(tokenization.tokenize, data, state.settings, state.tokenizer))


async def detokenize_endpoint(request: Request) -> JSONResponse:
    state = _state(request)  # open, as /tokenize
    data = await read_json_body(request, state.settings.max_body_bytes)
    return JSONResponse(await asyncio.to_thread(tokenization.detokenize, data, state.settings, state.tokenizer))


async def get_plan(request: Request) -> JSONResponse:
    state = _state(request)
    check_auth(request.headers.get("authorization"), state.settings.api_key)
    return JSONResponse(state.live_plan.view())


async def post_plan(request: Request) -> JSONResponse:
    """Apply an operator's plan: 200 when applied at once (route weights, role flips), 202 when
    workers start or retire in the background (GET /plan follows it); ?dry_run=true only reports."""
    state = _state(request)
    check_auth(request.headers.get("authorization"), state.settings.api_key)
    dry_run = request.query_params.get("dry_run", "false").lower()
    if dry_run not in ("true", "false"):
        raise ApiError(400, f"dry_run={dry_run!r}; use true or false", param="dry_run")
    data = await read_json_body(request, state.settings.max_body_bytes)
    entry = state.live_plan.apply(data, dry_run=dry_run == "true")
    return JSONResponse(entry, status_code=202 if entry["action"] == "change" else 200)


async def version(_request: Request) -> JSONResponse:
    return JSONResponse(tokenization.versions())


async def prometheus_metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.observe_cluster(state.cluster)
    state.metrics.observe_window(state.runner.window.summary())
    state.metrics.observe_admission(state.admission)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def _serve(request: Request, kind: ApiKind) -> Response:
    state = _state(request)
    settings = state.settings
    check_auth(request.headers.get("authorization"), settings.api_key)
    prep = await prepare_request(kind, await read_json_body(request, settings.max_body_bytes), settings,
                                 state.tokenizer)
    if state.admission.is_full():
        state.metrics.requests.labels(kind.metrics_label, "rejected").inc()
        raise ApiError(429, "the server is at capacity; retry later", error_type="rate_limit_error")
    header = ResponseHeader(("cmpl-" if kind is ApiKind.COMPLETION else "chatcmpl-") + uuid.uuid4().hex,
                            int(time.time()), settings.served_model_name)
    if prep.stream:
        return StreamingResponse(stream_events(state.runner, prep, header), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    collect = asyncio.ensure_future(state.runner.collect(prep))
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
    return JSONResponse(completion_body(prep, header, collect.result()))


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
