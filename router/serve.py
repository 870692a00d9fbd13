"""`python -m router serve`: start the workers, wait for them, serve HTTP, drain on exit.

Deployment shapes, all behind the same router:
- no arguments: the embedded default, one prefill and one decode worker of
  the tiny model on this machine;
- `--plan plan.json`: the workers and routes the planner chose, as local
  processes;
- `--plan plan.json --ray [ADDRESS]`: the same, placed as Ray actors on the
  nodes and GPU types the plan names (see `router.launch_ray`).

Whichever launcher started the workers also starts and retires them when a
`POST /plan` asks for it (router.plan_changes), beside the supervisor that
restarts workers that died (never one that was retired).

What the user sees is short: one line per worker as it starts and as it
becomes healthy (or fails, naming its log), then the ready line with the URL.
The workers' and engines' own output goes to log files (`--verbose`: to the
terminal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from common.aio import run_event_loop
from common.cache_routing import DEFAULT_DECODE_FIRST_MAX_TOKENS, DEFAULT_ROUTING, DEFAULT_SHARE_SLACK_REQUESTS
from router.admission import Admission
from router.app import create_app
from router.cluster import DEFAULT_MAX_MIGRATIONS, Cluster
from router.deployment import Deployment, deployment_from_plan, embedded_default
from router.launch_local import LocalLauncher, default_log_dir
from router.metrics import RouterMetrics
from router.plan_changes import PlanChanges
from router.prepare import RouterSettings
from router.worker_client import WorkerUnavailable

log = logging.getLogger(__name__)

LOADING_NOTE_EVERY_S = 30.0  # how often a start that is still loading says so
API_LAYERS = ("hexserve", "vllm")  # the router's own OpenAI layer, or vLLM's over the cluster (router.vllm_api)


class StartupError(RuntimeError):
    """The cluster could not start (a worker exited or timed out while loading); the message says where to look."""


def say(line: str) -> None:
    """A progress line for the person who started the router (stdout, at once, whatever the log level)."""
    print(line, flush=True)


@dataclass(slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    plan: Path | None = None
    ray_address: str | None = None  # None: local processes; "auto"/"local"/"ray://...": Ray
    model: str | None = None
    served_model_name: str | None = None
    max_model_len: int = 1024
    kv_connector: str = "zmq"
    api_key: str | None = None
    max_running: int = 256
    max_waiting: int = 1024
    worker_ready_timeout_s: float = 900.0
    log_dir: Path | None = None  # None: a new folder per run (default_log_dir), printed at start
    verbose: bool = False  # worker and engine output on the router's terminal instead of in log files
    worker_host: str = "127.0.0.1"
    worker_link: str = "ipc"  # local workers: control and KV over Unix sockets (ipc) or TCP on worker_host
    restart_workers: bool = True
    restart_check_s: float = 2.0
    block_size: int | None = None  # workers' KV-cache block tokens; None: vLLM's default
    max_migrations: int = DEFAULT_MAX_MIGRATIONS  # times a stream may move after its decode worker died
    routing: str = DEFAULT_ROUTING  # common.cache_routing.ROUTING_POLICIES
    share_slack_requests: float = DEFAULT_SHARE_SLACK_REQUESTS
    decode_first_max_tokens: int = DEFAULT_DECODE_FIRST_MAX_TOKENS
    # Prefill and decode workers run a kv_both connector: POST /plan may flip their roles without a restart.
    flexible_roles: bool = False
    api: str = "vllm"  # API_LAYERS
    vllm_args: str = ""  # with api "vllm": more `vllm serve` flags for its OpenAI layer


def build_deployment(options: ServeOptions) -> Deployment:
    if options.plan is None:
        return embedded_default(model=options.model, served_model_name=options.served_model_name,
                                max_model_len=options.max_model_len, kv_connector=options.kv_connector,
                                host=options.worker_host, worker_link=options.worker_link,
                                block_size=options.block_size, flexible_roles=options.flexible_roles)
    from common.plan import load_plan

    return deployment_from_plan(load_plan(options.plan), model=options.model,
                                served_model_name=options.served_model_name,
                                max_model_len=options.max_model_len, kv_connector=options.kv_connector,
                                host=options.worker_host, worker_link=options.worker_link,
                                block_size=options.block_size, flexible_roles=options.flexible_roles)


def policy_options(options: ServeOptions) -> dict:
    """The cache-aware policy's settings (the other policies take none)."""
    if options.routing != "cache-aware":
        return {}
    return dict(share_slack_requests=options.share_slack_requests,
                decode_first_max_tokens=options.decode_first_max_tokens)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def make_launcher(options: ServeOptions, deployment: Deployment):
    """Ray actors with --ray, else local processes; both start a WorkerSpec the same way."""
    if options.ray_address is None:
        return LocalLauncher(log_dir=None if options.verbose else options.log_dir or default_log_dir())
    from router.launch_ray import RayLauncher

    # A real model runs on the GPUs the plan names (bundles ask Ray for GPUs,
    # which sets CUDA_VISIBLE_DEVICES); a rehearsal with the tiny model does not.
    return RayLauncher(address=options.ray_address, deployment=deployment, use_gpus=options.model is not None)


def reserve_listener(host: str, port: int) -> socket.socket:
    """The router's HTTP socket, bound before any worker starts: a port in use is
    refused at once rather than after minutes of loading, and no worker's own
    socket can take the port meanwhile (uvicorn listens on it once ready)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a port in TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror}); "
                           f"choose another --port or --host") from None
    return sock


async def serve(options: ServeOptions, ready: asyncio.Event | None = None) -> None:
    listener = reserve_listener(options.host, options.port)
    try:
        await _serve_reserved(options, ready, listener)
    finally:
        listener.close()


async def _serve_reserved(options: ServeOptions, ready: asyncio.Event | None, listener: socket.socket) -> None:
    deployment = build_deployment(options)
    frontend = await asyncio.to_thread(prepare_vllm_frontend, options, deployment) if options.api == "vllm" else None
    launcher = make_launcher(options, deployment)
    _say_starting(deployment, launcher)
    started_at = time.monotonic()
    deployment.workers = [launcher.start(spec) for spec in deployment.workers]
    cluster = Cluster(workers=deployment.workers, routes=deployment.routes, kv_connector=options.kv_connector,
                      routing=options.routing, policy_options=policy_options(options),
                      max_migrations=options.max_migrations)
    supervisor = None
    metrics = RouterMetrics()
    plan_changes = PlanChanges(cluster, launcher, deployment.settings, metrics,
                               ready_timeout_s=options.worker_ready_timeout_s)
    try:
        await cluster.start(process_alive=launcher.alive_checks())
        # vLLM's layer brought the model's tokenizer already (its renderer's): not loaded twice.
        tokenizer = (frontend.renderer.tokenizer if frontend is not None
                     else await asyncio.to_thread(load_tokenizer, deployment.model_path))
        await _wait_ready(cluster, launcher, options.worker_ready_timeout_s, started_at)
        app = create_app(
            cluster,
            RouterSettings(served_model_name=deployment.served_model_name, max_model_len=deployment.max_model_len,
                           api_key=options.api_key),
            tokenizer,
            admission=Admission(max_running=options.max_running, max_waiting=options.max_waiting),
            metrics=metrics, plan_source=str(options.plan) if options.plan else "embedded default",
            plan_changes=plan_changes,
        )
        if frontend is not None:
            app = await frontend.app(app)
        if options.restart_workers:
            supervisor = asyncio.ensure_future(_supervise(launcher, options.restart_check_s))
        await _serve_http(app, options, deployment, ready, listener)
    finally:
        if supervisor is not None:
            supervisor.cancel()
        await plan_changes.close()  # a change in progress stops; the launcher stops what it started
        await cluster.close()
        # uvicorn has finished in-flight HTTP requests (graceful); workers drain theirs.
        await asyncio.to_thread(launcher.stop)


def prepare_vllm_frontend(options: ServeOptions, deployment: Deployment):
    """vLLM's OpenAI layer for `--api vllm`, checked before any worker starts."""
    from router.vllm_api import VllmFrontend

    say("hexserve: preparing vLLM's OpenAI layer")
    try:
        return VllmFrontend.prepare(deployment.model_path, deployment.served_model_name, deployment.max_model_len,
                                    options.vllm_args)
    except (ValueError, TypeError) as exc:  # vLLM's own config checks: the message names the flag
        raise StartupError(f"vLLM's OpenAI layer refused its settings: {exc}") from None


def _say_starting(deployment: Deployment, launcher) -> None:
    say(f"hexserve: starting {len(deployment.workers)} worker(s) of {deployment.served_model_name!r}; "
        f"{launcher.logs_note()}")
    for spec in deployment.workers:
        say(f"  {spec.worker_id} ({spec.role}): starting, loading the model")


async def _wait_ready(cluster: Cluster, launcher, timeout_s: float, started: float) -> None:
    """Until every worker answers: one line per worker as it becomes healthy
    (seconds since `started`, when the workers were launched), a note every
    LOADING_NOTE_EVERY_S while some still load; the first that exits or times
    out stops the start with the log to read."""
    pending = {asyncio.ensure_future(client.wait_healthy(timeout_s)): worker_id
               for worker_id, client in cluster.clients.items()}
    next_note_at = started + LOADING_NOTE_EVERY_S
    try:
        while pending:
            done, _ = await asyncio.wait(pending, timeout=max(0.05, next_note_at - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                worker_id = pending.pop(task)
                elapsed_s = time.monotonic() - started
                try:
                    task.result()
                except WorkerUnavailable as exc:
                    where = launcher.log_location(worker_id)
                    say(f"  {worker_id}: failed after {elapsed_s:.1f} s; read {where}")
                    raise StartupError(f"the cluster did not start: {exc}; see {where}") from None
                say(f"  {worker_id}: healthy after {elapsed_s:.1f} s")
            if pending and time.monotonic() >= next_note_at:
                say(f"  still loading: {', '.join(sorted(pending.values()))} ({time.monotonic() - started:.0f} s)")
                next_note_at += LOADING_NOTE_EVERY_S
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _serve_http(app, options: ServeOptions, deployment: Deployment, ready: asyncio.Event | None,
                      listener: socket.socket) -> None:
    """uvicorn until SIGTERM/SIGINT, which finish in-flight requests first; says when it is ready."""
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                                          timeout_graceful_shutdown=30))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    server_task = asyncio.ensure_future(server.serve(sockets=[listener]))
    while not server.started and not server_task.done():
        await asyncio.sleep(0.05)
    if not server.started:  # uvicorn logged why and ends its task with SystemExit; say it in one line
        with contextlib.suppress(BaseException):
            await server_task
        raise StartupError(f"the HTTP server did not start on {options.host}:{options.port}; see the log above")
    print(f"hexserve router ready: http://{options.host}:{options.port}/v1 "
          f"(model {deployment.served_model_name!r}, {len(deployment.workers)} workers, "
          f"{len(deployment.routes)} route(s))", flush=True)
    if ready is not None:
        ready.set()
    await server_task


async def _supervise(launcher, interval_s: float) -> None:
    """Restart workers whose process died; health checks put them back in rotation when ready."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            restarted = await asyncio.to_thread(launcher.restart_dead)
        except Exception:  # noqa: BLE001 - logged with its traceback; supervising goes on and the next round retries
            log.exception("could not restart dead workers")
            continue
        for worker_id in restarted:
            log.warning("worker %s had exited; started it again", worker_id)


def run(options: ServeOptions) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        run_event_loop(serve(options))

