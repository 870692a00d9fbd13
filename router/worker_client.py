"""The router's handle on one worker: a DEALER socket, a receive loop, health checks.

Each request gets its own queue of `Output` deltas. When a worker stops
answering PINGs (or its process is seen dead) it is marked unhealthy and every
request in flight on it is failed at once with `WorkerUnavailable`, so no
client waits on a worker that will never answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from common.roles import Role
from common.sockets import make_socket
from common.wire import ProtocolError
from engine import control_protocol as proto
from engine.worker_spec import WorkerSpec
from vllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class WorkerUnavailable(RuntimeError):
    """The worker died, stopped answering health checks, or refused the request."""


_FAILED = object()  # queue sentinel: the worker failed under this request


@dataclass(slots=True)
class WorkerClient:
    info: WorkerSpec
    ctx: zmq.asyncio.Context
    health_interval_s: float = 0.5
    health_timeout_s: float = 3.0
    is_process_alive: Callable[[], bool] | None = None
    healthy: bool = False
    load: proto.LoadReport | None = None
    outstanding_tokens: int = 0  # router-side estimate of work queued on this worker
    last_pong_at: float = 0.0
    _sock: zmq.asyncio.Socket | None = None
    _queues: dict[str, asyncio.Queue] = field(default_factory=dict)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _nonce: itertools.count = field(default_factory=itertools.count)
    _ever_healthy: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def num_inflight(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._sock = make_socket(self.ctx, zmq.DEALER, self.info.control_endpoint, bind=False,
                                 **proto.CONTROL_SOCKET_LIMITS)
        self._tasks = [asyncio.ensure_future(self._receive_loop()), asyncio.ensure_future(self._health_loop())]
        for task in self._tasks:
            task.add_done_callback(self._log_loop_exit)

    def _log_loop_exit(self, task: asyncio.Task) -> None:
        """A loop that dies of an error says so (with its traceback); else the
        worker would only look silent and leave the rotation for no stated reason."""
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %s: the client's %s stopped", self.worker_id, task.get_coro().__name__,
                      exc_info=task.exception())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_all(f"worker {self.worker_id} client closed")
        if self._sock is not None:
            self._sock.close(linger=0)

    async def wait_healthy(self, timeout_s: float) -> None:
        """Until the worker first answers a ping. Raises WorkerUnavailable on timeout,
        or as soon as its process has exited (a worker that died while loading
        must not keep the router waiting for the whole timeout)."""
        deadline = time.monotonic() + timeout_s
        while not self._ever_healthy.is_set():
            if self.is_process_alive is not None and not self.is_process_alive():
                raise WorkerUnavailable(f"worker {self.worker_id} exited before it became healthy")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerUnavailable(
                    f"worker {self.worker_id} at {self.info.control_endpoint} did not become healthy in {timeout_s:.0f} s"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ever_healthy.wait(), min(remaining, 0.5))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        kv_transfer_params: dict | None = None,
    ) -> AsyncIterator[proto.Output]:
        """Submit a request and yield its Output deltas until finished.

        Raises WorkerUnavailable if the worker is (or becomes) unhealthy. If the
        consumer stops early (client disconnect), the request is aborted on the worker.
        """
        if not self.healthy:
            raise WorkerUnavailable(f"worker {self.worker_id} is not healthy")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} already in flight on {self.worker_id}")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            await self._send(proto.Submit(
                version=proto.PROTOCOL_VERSION, request_id=request_id,
                prompt_token_ids=prompt_token_ids, sampling=sampling,
                kv_transfer_params=kv_transfer_params))
            while True:
                item = await queue.get()
                if item is _FAILED:
                    raise WorkerUnavailable(f"worker {self.worker_id} became unavailable during request {request_id}")
                if item.error is not None:
                    finished = True
                    raise WorkerUnavailable(f"worker {self.worker_id} failed request {request_id}: {item.error}")
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished and self.healthy:
                await self._abort(request_id)

    async def _abort(self, request_id: str) -> None:
        """Ask the worker to drop a request the router no longer waits for. Best
        effort: a worker that cannot take the message is failing its health checks,
        and its requests end with it."""
        try:
            await self._send(proto.Abort(version=proto.PROTOCOL_VERSION, request_id=request_id))
        except (WorkerUnavailable, zmq.ZMQError) as exc:
            log.warning("could not abort request %s on worker %s: %s", request_id, self.worker_id, exc)

    async def _send(self, message: proto.Message) -> None:
        try:
            await self._sock.send_multipart(proto.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise WorkerUnavailable(f"worker {self.worker_id} is not draining its control socket") from None

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                message = proto.decode(frames)
            except ProtocolError as exc:
                log.warning("refused a message from worker %s: %s", self.worker_id, exc)
                continue
            if isinstance(message, proto.Pong):
                self.last_pong_at = time.monotonic()
                if not self._role_expected(message.load.role) and (self.load is None or self.load.role != message.load.role):
                    log.error("worker %s reports role %s; the deployment started it as %s",
                              self.worker_id, message.load.role, self.info.role)
                self.load = message.load
                if not self.healthy:
                    log.info("worker %s is healthy", self.worker_id)
                self.healthy = True
                self._ever_healthy.set()
            elif isinstance(message, proto.Output):
                queue = self._queues.get(message.request_id)
                if queue is not None:
                    queue.put_nowait(message)

    def _role_expected(self, reported: Role) -> bool:
        """A worker reports the role it started with; a flexible one may since have been
        flipped between prefill and decode (Cluster.set_plan) and still reports the first."""
        if reported == self.info.role:
            return True
        return self.info.flexible and {reported, self.info.role} <= {Role.PREFILL, Role.DECODE}

    async def _health_loop(self) -> None:
        while True:
            # A ping that cannot be queued is not an error here: the missing pong
            # is what takes the worker out of rotation, below.
            with contextlib.suppress(WorkerUnavailable):
                await self._send(proto.Ping(version=proto.PROTOCOL_VERSION, nonce=next(self._nonce)))
            await asyncio.sleep(self.health_interval_s)
            dead_process = self.is_process_alive is not None and not self.is_process_alive()
            silent = self.healthy and time.monotonic() - self.last_pong_at > self.health_timeout_s
            if self.healthy and (dead_process or silent):
                reason = "its process exited" if dead_process else f"no health reply for {self.health_timeout_s:.1f} s"
                log.warning("worker %s taken out of rotation: %s", self.worker_id, reason)
                self.healthy = False
                self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put_nowait(_FAILED)
