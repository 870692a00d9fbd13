"""vLLM's own OpenAI app, served over the cluster (`router serve --api vllm`).

vLLM's API server is built from its argument namespace, a `VllmConfig` and an
`EngineClient` (vllm/entrypoints/launchers/api_server/entry.py: build_app,
then init_app_state). The router builds the same three without an engine: the
config from the model's files (no weights are loaded here), the client from
router.engine_client. The router's own endpoints for operators (/health with
per-worker state, /metrics, /plan) replace vLLM's of the same path, and the
router's own guard stands in front (one home for the API key and the body
limit, with OpenAI-shaped errors: router.prepare).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from dataclasses import dataclass

from fastapi import FastAPI

from router.openai_schema import ApiError
from router.prepare import RouterSettings, check_auth, read_limited_body

ROUTER_PATHS = ("/health", "/metrics", "/plan")  # the router's, not vLLM's, at these paths


def vllm_server_args(model_path: str, served_model_name: str, max_model_len: int,
                     extra: str = "") -> argparse.Namespace:
    """vLLM's `vllm serve` namespace for this model, plus the user's `extra` vLLM flags
    (a tool-call parser, a chat template, ...); flags vLLM's parser refuses are refused here too."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="router serve --vllm-args"))
    argv = ["--model", model_path, "--served-model-name", served_model_name, "--max-model-len", str(max_model_len),
            "--disable-log-stats"]
    args = parser.parse_args(argv + shlex.split(extra))
    _refuse_what_the_layer_cannot_set(args, parser.parse_args(argv))
    validate_parsed_serve_args(args)
    return args


# vLLM server flags the router's own HTTP server or options own: set there, not through --vllm-args.
_ROUTER_OWNED = {"host", "port", "uds", "api_key", "api_server_count", "enable_ssl_refresh",
                 "disable_uvicorn_access_log", "uvicorn_log_level"}
_ROUTER_OWNED_PREFIXES = ("ssl_", "h11_")


def _refuse_what_the_layer_cannot_set(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """--vllm-args configures vLLM's OpenAI layer only: an engine flag would reach no worker,
    and a server flag no listening socket, so either is refused by name rather than ignored."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for dest in sorted(k for k, v in vars(args).items() if vars(defaults).get(k) != v):
        flag = "--" + dest.replace("_", "-")
        if dest in engine_fields:
            raise ValueError(f"--vllm-args: {flag} configures the engines, which this router starts from its "
                             "plan and its own options (router serve --help); it cannot be set here")
        if dest in _ROUTER_OWNED or dest.startswith(_ROUTER_OWNED_PREFIXES):
            raise ValueError(f"--vllm-args: {flag} belongs to the router's own HTTP server; use router serve's "
                             "own options (--host, --port, --api-key)")


@dataclass(slots=True)
class VllmFrontend:
    """What vLLM's API server is built from, prepared before any worker starts (a bad
    flag fails at once): its namespace, and the config, renderer and input processor
    that its AsyncLLM would build, here without an engine (no weights are loaded)."""

    args: argparse.Namespace
    vllm_config: object
    renderer: object
    input_processor: object

    @classmethod
    def prepare(cls, model_path: str, served_model_name: str, max_model_len: int,
                extra: str = "") -> VllmFrontend:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.renderers import renderer_from_config
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.input_processor import InputProcessor

        args = vllm_server_args(model_path, served_model_name, max_model_len, extra)
        vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER)
        renderer = renderer_from_config(vllm_config)
        return cls(args, vllm_config, renderer, InputProcessor(vllm_config, renderer))

    async def app(self, router_app: FastAPI) -> RouterGuard:
        """vLLM's app over the router's cluster (its runner: admission, routes, metrics), with
        the router's operator endpoints from `router_app` in place of vLLM's at those paths."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        from router.engine_client import ClusterEngineClient

        client = ClusterEngineClient(router_app.state.router.runner, self.vllm_config, self.renderer,
                                     self.input_processor)
        supported_tasks = await client.get_supported_tasks()
        app = build_app(self.args, supported_tasks, client.model_config)
        await init_app_state(client, app.state, self.args, supported_tasks)
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ROUTER_PATHS]
        app.router.routes.extend(r for r in router_app.router.routes if getattr(r, "path", None) in ROUTER_PATHS)
        app.state.router = router_app.state.router
        # Wrapped, not add_middleware: vLLM's build has already built the middleware stack.
        return RouterGuard(app, router_app.state.router.settings)


class RouterGuard:
    """In front of vLLM's app: the API key on /v1 (as vLLM guards it) and the body limit,
    refused the way the router's own layer refuses them (401 / 413, OpenAI error bodies)."""

    def __init__(self, app, settings: RouterSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if scope["path"].startswith("/v1"):
                check_auth(headers.get("authorization"), self.settings.api_key)
            body = await read_limited_body(_body_chunks(receive), headers.get("content-length"),
                                           self.settings.max_body_bytes)
        except ApiError as exc:
            return await _send_json(send, exc.status_code, exc.body())
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # then the disconnect, when the client goes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _body_chunks(receive):
    """An ASGI request's body, chunk by chunk."""
    while True:
        message = await receive()
        yield message.get("body", b"")
        if not message.get("more_body"):
            return


async def _send_json(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
