"""The workers behind one router and the life of a request across them.

    choose route (P, D) ──▶ P: prompt, PREFILL_SAMPLING, kv params "send to D"   (prefill.request)
                            P finishes ──▶ its kv_transfer_params say where the KV is
                       ──▶ D: prompt, client's sampling, P's handoff              (decode.request)
                            D streams tokens ──▶ client

A colocated worker (a route from a worker to itself) gets the client's
request directly: it computes the prompt and generates in one engine.

A worker failure before the client has seen a token is retried once on
another route; after that, the request fails at once with a clear error. The
router's per-worker `outstanding_tokens` (prompt tokens queued on P; prompt
plus output budget on D) is the live-load signal the routing policy reads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq.asyncio

from common.routing import NoRouteAvailable, Route, RoutePolicy
from decode import decode_kv_params
from engine import control_protocol as proto
from engine.worker_spec import WorkerSpec
from prefill import PREFILL_SAMPLING, prefill_kv_params
from router.worker_client import WorkerClient, WorkerUnavailable

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first try and one retry on another route


@dataclass
class Cluster:
    workers: list[WorkerSpec]
    routes: list[Route]
    kv_connector: str = "zmq"
    health_interval_s: float = 0.5
    health_timeout_s: float = 3.0
    clients: dict[str, WorkerClient] = field(default_factory=dict)
    policy: RoutePolicy | None = None
    _ctx: zmq.asyncio.Context | None = None
    _ids: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        known = {w.worker_id for w in self.workers}
        for route in self.routes:
            for worker_id in (route.prefill_worker, route.decode_worker):
                if worker_id not in known:
                    raise ValueError(f"route {route.prefill_worker}->{route.decode_worker} names unknown worker {worker_id!r}")
        self.policy = RoutePolicy(self.routes)

    async def start(self, process_alive: dict | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        for info in self.workers:
            client = WorkerClient(
                info=info, ctx=self._ctx,
                health_interval_s=self.health_interval_s, health_timeout_s=self.health_timeout_s,
                is_process_alive=(process_alive or {}).get(info.worker_id),
            )
            client.start()
            self.clients[info.worker_id] = client

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.gather(*(c.wait_healthy(timeout_s) for c in self.clients.values()))

    async def close(self) -> None:
        clients = list(self.clients.values())
        results = await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for client, result in zip(clients, results):
            if isinstance(result, Exception):  # closing goes on for the others; say what failed
                log.warning("closing the client of worker %s failed", client.worker_id, exc_info=result)
        if self._ctx is not None:
            self._ctx.term()

    def is_healthy(self, worker_id: str) -> bool:
        return self.clients[worker_id].healthy

    def any_route_healthy(self) -> bool:
        return any(self.is_healthy(r.prefill_worker) and self.is_healthy(r.decode_worker) for r in self.routes)

    def _outstanding(self, worker_id: str) -> int:
        return self.clients[worker_id].outstanding_tokens

    def choose_route(self, exclude: frozenset[Route] = frozenset()) -> Route:
        return self.policy.choose(self.is_healthy, self._outstanding, exclude)

    async def generate(
        self, prompt_token_ids: list[int], sampling: proto.SamplingSpec, on_retry=None,
    ) -> AsyncIterator[tuple[Route, proto.Output]]:
        """Yield (route, Output delta) until finished; retry once if no token was yielded yet."""
        tried: set[Route] = set()
        base_id = uuid.uuid4().hex[:16]
        for attempt in range(MAX_ATTEMPTS):
            try:
                route = self.choose_route(frozenset(tried))
            except NoRouteAvailable:
                if attempt == 0 or not self.any_route_healthy():
                    raise
                route = self.choose_route()  # only the failed route is left and it recovered
            tried.add(route)
            yielded = False
            try:
                async for output in self._run_on_route(route, f"{base_id}-{attempt}", prompt_token_ids, sampling):
                    yielded = yielded or bool(output.token_ids) or output.finished
                    yield route, output
                return
            except WorkerUnavailable as exc:
                if yielded or attempt + 1 == MAX_ATTEMPTS:
                    raise
                log.warning("retrying request on another route after: %s", exc)
                if on_retry is not None:
                    on_retry()

    async def _run_on_route(
        self, route: Route, request_id: str, prompt_token_ids: list[int], sampling: proto.SamplingSpec,
    ) -> AsyncIterator[proto.Output]:
        kv_params = None
        if route.prefill_worker != route.decode_worker:
            prefill_final = await self._prefill(route, request_id, prompt_token_ids)
            kv_params = decode_kv_params(prefill_final, self.kv_connector)
        decode = self.clients[route.decode_worker]
        budget = len(prompt_token_ids) + sampling.max_tokens
        decode.outstanding_tokens += budget
        try:
            async for output in decode.generate(f"{request_id}-d", prompt_token_ids, sampling, kv_params):
                yield output
        finally:
            decode.outstanding_tokens -= budget

    async def _prefill(self, route: Route, request_id: str, prompt_token_ids: list[int]) -> proto.Output | None:
        """Run the prompt on the route's prefill worker, its KV shipped to the
        route's decode worker; the prefill's final output (the handoff)."""
        prefill = self.clients[route.prefill_worker]
        decode_spec = self.clients[route.decode_worker].info
        kv_params = prefill_kv_params(decode_spec, f"{request_id}-kv", self.kv_connector)
        num_prompt = len(prompt_token_ids)
        prefill.outstanding_tokens += num_prompt
        final = None
        try:
            async for output in prefill.generate(f"{request_id}-p", prompt_token_ids, PREFILL_SAMPLING, kv_params):
                final = output
        finally:
            prefill.outstanding_tokens -= num_prompt
        return final
