"""A worker: one in-process vLLM `AsyncLLM` behind a ZeroMQ control endpoint.

Every role runs this same server (see `prefill/` and `decode/` for what each
adds: the engine's KV connector is the producer on a prefill worker, the
consumer on a decode worker, absent on a colocated one). The server knows its
role only to report it; the router drives every worker through
`engine.control_protocol`.

Why in-process AsyncLLM rather than `vllm serve` behind HTTP: the router needs
token-level streaming, `kv_transfer_params` from the finished prefill, abort,
and the scheduler's own load figures (running, waiting, KV-cache use). AsyncLLM
gives all four directly; an HTTP server would add a JSON/SSE hop per token and
hide the scheduler stats behind a Prometheus scrape.

Concurrency: one asyncio loop. The receive loop only decodes and dispatches;
each request runs as its own task that iterates the engine's output stream and
sends deltas back. Nothing blocking runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from common.aio import run_event_loop
from common.roles import Role
from common.sockets import make_socket, prepare_bind
from common.wire import ProtocolError
from engine import control_protocol as proto
from engine.config import EngineSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _LoadState:
    """Latest scheduler figures, written by the stat logger, read by PING."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # cumulative: vLLM reports each interval's increments
    prefix_cache_hits: int = 0


def _make_stat_logger_factory(state: _LoadState):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadRecorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                state.num_running = scheduler_stats.num_running_reqs
                state.num_waiting = scheduler_stats.num_waiting_reqs
                state.kv_cache_usage = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                if prefix is not None:
                    state.prefix_cache_queries += prefix.queries
                    state.prefix_cache_hits += prefix.hits

        def log_engine_initialized(self):
            pass

    return lambda vllm_config, engine_index=0: LoadRecorder(vllm_config, engine_index)


def to_sampling_params(sampling, kv_transfer_params: dict[str, Any] | None):
    """The router's SamplingParams as this worker runs them: deltas out, and the
    kv params (the router's, never a client's extra_args) for the connector."""
    from vllm.sampling_params import RequestOutputKind

    params = sampling.clone()
    params.output_kind = RequestOutputKind.DELTA
    extra_args = {k: v for k, v in (params.extra_args or {}).items() if k != "kv_transfer_params"}
    if kv_transfer_params:  # the client's other extra args (vllm_xargs) stay theirs
        extra_args["kv_transfer_params"] = dict(kv_transfer_params)
    params.extra_args = extra_args or None
    return params


def wire_logprobs(positions) -> list[proto.PositionLogprobs] | None:
    """vLLM's per-position {token id: Logprob} (None for a prompt's first position) on the wire."""
    if positions is None:
        return None
    return [[proto.TokenLogprob(token_id, entry.logprob, entry.rank, entry.decoded_token)
             for token_id, entry in (position or {}).items()] for position in positions]


@dataclass(slots=True)
class WorkerServer:
    """Serves one engine on `control_endpoint` until `stop()` or SIGTERM."""

    settings: EngineSettings
    role: Role
    worker_id: str
    control_endpoint: str
    kv_stats_reader: Any = None  # callable returning dict[str, float], from the KV connector
    # Builds the engine; None: vLLM's AsyncLLM from `settings`. Benchmarks of the
    # router's own overhead pass a stand-in (engine.standin) here.
    engine_factory: Any = None
    drain_timeout_s: float = 30.0
    _engine: Any = None
    _sock: Any = None
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    _load: _LoadState = field(default_factory=_LoadState)
    _stopping: asyncio.Event | None = None
    _kv_stats_failures: int = 0

    def __post_init__(self) -> None:
        self.role = Role.parse(self.role)

    def _build_vllm_engine(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from engine import detokenizer_fix

        self.settings.apply_process_env()
        detokenizer_fix.install()  # a migrated stream's prompt may end mid-character (vLLM #48853)
        if self.settings.kv_events_endpoint:
            prepare_bind(self.settings.kv_events_endpoint)  # vLLM's publisher binds it, before our sockets exist
        return AsyncLLM.from_engine_args(
            AsyncEngineArgs(**self.settings.engine_kwargs()),
            stat_loggers=[_make_stat_logger_factory(self._load)],
        )

    async def serve(self) -> None:
        # Import vLLM's request types before answering health checks: a first
        # import inside a request would stall the loop for seconds.
        from vllm import SamplingParams  # noqa: F401

        self._stopping = asyncio.Event()
        self._engine = (self.engine_factory or self._build_vllm_engine)()
        ctx = zmq.asyncio.Context()
        self._sock = make_socket(ctx, zmq.ROUTER, self.control_endpoint, bind=True, router_mandatory=True,
                                 **proto.CONTROL_SOCKET_LIMITS)
        log.info("%s worker %s serving on %s", self.role, self.worker_id, self.control_endpoint)
        try:
            await self._receive_loop()
        finally:
            await self._drain()
            self._sock.close(linger=0)
            ctx.term()
            self._engine.shutdown()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _receive_loop(self) -> None:
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                recv = asyncio.ensure_future(self._sock.recv_multipart(copy=True))
                done, _ = await asyncio.wait({recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    break
                frames = recv.result()
                identity, body = frames[0], frames[1:]
                try:
                    message = proto.decode(body)
                except ProtocolError as exc:
                    log.warning("refused a control message from %r: %s", identity, exc)
                    request_id = proto.request_id_of(body) if len(body) == 2 else None
                    if request_id is not None:  # tell the router, so the request fails instead of hanging
                        asyncio.ensure_future(self._send(identity, proto.Output(
                            version=proto.PROTOCOL_VERSION, request_id=request_id, finished=True,
                            error=f"refused: {exc}")))
                    continue
                self._dispatch(identity, message)
        finally:
            stop_wait.cancel()

    def _dispatch(self, identity: bytes, message: proto.Message) -> None:
        if isinstance(message, proto.Submit):
            if message.request_id in self._tasks:
                asyncio.ensure_future(self._send(identity, proto.Output(
                    version=proto.PROTOCOL_VERSION, request_id=message.request_id, finished=True,
                    error=f"request id {message.request_id!r} is already in flight on this worker")))
                return
            task = asyncio.ensure_future(self._run_request(identity, message))
            self._tasks[message.request_id] = task
            task.add_done_callback(lambda _t, rid=message.request_id: self._tasks.pop(rid, None))
        elif isinstance(message, proto.Abort):
            task = self._tasks.get(message.request_id)
            if task is not None:
                task.cancel()
        elif isinstance(message, proto.Ping):
            asyncio.ensure_future(self._send(identity, proto.Pong(
                version=proto.PROTOCOL_VERSION, nonce=message.nonce, load=self.load_report())))

    def load_report(self) -> proto.LoadReport:
        return proto.LoadReport(
            worker_id=self.worker_id,
            role=self.role,
            num_running=self._load.num_running,
            num_waiting=self._load.num_waiting,
            kv_cache_usage=self._load.kv_cache_usage,
            num_inflight=len(self._tasks),
            kv_stats=self._read_kv_stats(),
            prefix_cache_queries=self._load.prefix_cache_queries,
            prefix_cache_hits=self._load.prefix_cache_hits,
        )

    def _read_kv_stats(self) -> dict[str, float]:
        """The connector's transfer counters. A reader that fails does not fail the
        health reply: the failure is logged (with its traceback the first time, the
        ping comes every 0.5 s) and counted in `stats_read_failures`, which the
        router shows in /metrics next to the counters it could not read."""
        if self.kv_stats_reader is None:
            return {}
        stats: dict[str, float] = {}
        try:
            stats = {k: float(v) for k, v in self.kv_stats_reader().items()}
        except Exception:  # noqa: BLE001 - logged and counted, see above
            self._kv_stats_failures += 1
            if self._kv_stats_failures == 1:
                log.exception("could not read the KV connector's counters (counted in stats_read_failures)")
            else:
                log.debug("could not read the KV connector's counters", exc_info=True)
        if self._kv_stats_failures:
            stats["stats_read_failures"] = float(self._kv_stats_failures)
        return stats

    async def _run_request(self, identity: bytes, submit: proto.Submit) -> None:
        request_id = submit.request_id
        num_prompt_tokens = len(submit.prompt_token_ids)
        try:
            params = to_sampling_params(submit.sampling, submit.kv_transfer_params)
            stream = self._engine.generate(
                {"prompt_token_ids": list(submit.prompt_token_ids)}, params, request_id
            )
            async for out in stream:
                completion = out.outputs[0]
                ok = await self._send(identity, proto.Output(
                    version=proto.PROTOCOL_VERSION,
                    request_id=request_id,
                    token_ids=list(completion.token_ids),
                    text=completion.text,
                    finished=out.finished,
                    finish_reason=completion.finish_reason if out.finished else None,
                    stop_reason=completion.stop_reason if out.finished else None,
                    num_prompt_tokens=num_prompt_tokens,
                    num_cached_tokens=out.num_cached_tokens or 0,
                    kv_transfer_params=out.kv_transfer_params if out.finished else None,
                    logprobs=wire_logprobs(completion.logprobs),
                    prompt_logprobs=wire_logprobs(out.prompt_logprobs),
                ))
                if not ok:  # the router is gone: stop spending compute on this request
                    await self._engine.abort(request_id)
                    return
        except asyncio.CancelledError:
            # Aborted by the router (client disconnected) or by shutdown: free the KV.
            try:
                await self._engine.abort(request_id)
            except Exception:  # noqa: BLE001 - the cancellation goes on; the failed abort is logged
                log.exception("could not abort request %s in the engine", request_id)
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the router, never swallowed
            log.exception("request %s failed", request_id)
            await self._send(identity, proto.Output(
                version=proto.PROTOCOL_VERSION, request_id=request_id, finished=True,
                num_prompt_tokens=num_prompt_tokens, error=f"{type(exc).__name__}: {exc}"))

    async def _send(self, identity: bytes, message: proto.Message) -> bool:
        try:
            await self._sock.send_multipart([identity, *proto.encode(message)])
            return True
        except zmq.ZMQError as exc:
            log.warning("could not reach router %r: %s", identity, exc)
            return False

    async def _drain(self) -> None:
        """Let in-flight requests finish (graceful shutdown), then cancel stragglers."""
        if not self._tasks:
            return
        log.info("draining %d in-flight request(s)", len(self._tasks))
        _, pending = await asyncio.wait(list(self._tasks.values()), timeout=self.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _watch_parent(parent_pid: int, server: WorkerServer) -> None:
    """Exit when the process that started us dies, so no worker outlives its router."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            log.warning("parent %d exited; stopping", parent_pid)
            server.stop()
            return


def run_worker(server: WorkerServer, exit_with_parent: bool = False) -> None:
    """Run a worker in this process until SIGTERM/SIGINT (which drain first)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        watcher = asyncio.ensure_future(_watch_parent(os.getppid(), server)) if exit_with_parent else None
        started = time.monotonic()
        try:
            await server.serve()
        finally:
            if watcher is not None:
                watcher.cancel()
            log.info("worker %s exited after %.1f s", server.worker_id, time.monotonic() - started)

    run_event_loop(main())
