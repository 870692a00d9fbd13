"""The workers behind one router and the life of a request across them.

    choose route (P, D) ──▶ P: prompt, prefill_sampling, kv params "send to D"  (prefill.request)
                            P finishes ──▶ its kv_transfer_params say where the KV is
                       ──▶ D: prompt, client's sampling, P's handoff              (decode.request)
                            D streams tokens ──▶ client

A colocated worker (a route from a worker to itself) gets the client's
request directly: it computes the prompt and generates in one engine.

A decode-first request (the cache-aware policy found all but a short suffix
of the prompt in D's prefix cache) also goes to D directly: D computes the
suffix itself and the prefill hop is skipped.

A worker failure before the client has seen a token is retried once on
another route; after that, the request fails at once with a clear error.
With no healthy prefill->decode route left (the only prefill or decode
worker died), any healthy worker serves the request alone (degraded: it
computes the prompt and decodes, decode workers first); disaggregation
resumes with the next request once a route is healthy again. The
router's per-worker `outstanding_tokens` (prompt tokens queued on P; prompt
plus output budget on D) is the live-load signal the routing policy reads;
the prefix index (fed by the workers' KV-cache events, router.kv_events)
tells the cache-aware policy how much of each prompt each worker holds.

The routes change live (`set_routes`), and with them the roles of flexible
workers (`set_plan`: a worker started with a kv_both connector flips between
prefill and decode without a restart); requests in flight finish where they
are, the next request sees the new plan. Workers join and leave while the
router runs (router.plan_changes): `add_worker` connects a started one,
`in_use` says whether one left out of the routes still has requests,
`remove_worker` lets go of one that has none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
import zmq.asyncio

from common.block_hash import block_keys
from common.cache_routing import DEFAULT_ROUTING, make_policy
from common.prefix_index import PrefixIndex
from common.roles import Role
from common.routing import NoRouteAvailable, Route, RouteChoice, RoutePolicy
from decode import decode_kv_params
from engine import control_protocol as proto
from engine.worker_spec import WorkerSpec
from vllm.sampling_params import SamplingParams
from prefill import prefill_kv_params, prefill_sampling
from router.kv_events import EventStats, WorkerEventFeed
from router.plan_diff import check_roles_and_routes
from router.worker_client import WorkerClient, WorkerUnavailable

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first try and one retry on another route
DEFAULT_MAX_MIGRATIONS = 1  # times one stream may move to another route after its decode worker failed
_DEGRADED_PREFERENCE = {Role.DECODE: 0, Role.COLOCATED: 1, Role.PREFILL: 2}


def _continued(sampling: SamplingParams, num_generated: int) -> SamplingParams:
    """The client's sampling for the rest of a stream that already produced `num_generated`
    tokens (its prompt logprobs went out with the first tokens)."""
    if not num_generated:
        return sampling
    return msgspec.structs.replace(sampling, max_tokens=sampling.max_tokens - num_generated,
                                   min_tokens=max(0, sampling.min_tokens - num_generated), prompt_logprobs=None)


def _finished_by_length(request_id: str) -> proto.Output:
    return proto.Output(version=proto.PROTOCOL_VERSION, request_id=request_id, finished=True, finish_reason="length")


@dataclass(slots=True)
class PromptStats:
    """Where prompts were computed: the engines' own count of the tokens their
    prefix cache supplied (`num_cached_tokens` of a request's first output)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    decode_first_requests: int = 0
    degraded_requests: int = 0  # served by one worker alone: no healthy route
    migrated_requests: int = 0  # streams moved to another route after their decode worker failed

    def count(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.prompt_tokens += num_prompt_tokens
        self.cached_tokens += num_cached_tokens

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Cluster:
    workers: list[WorkerSpec]
    routes: list[Route]
    kv_connector: str = "zmq"
    health_interval_s: float = 0.5
    health_timeout_s: float = 3.0
    clients: dict[str, WorkerClient] = field(default_factory=dict)
    routing: str = DEFAULT_ROUTING  # a name from common.cache_routing.ROUTING_POLICIES
    policy_options: dict = field(default_factory=dict)  # share_slack_requests, decode_first_max_tokens
    policy: RoutePolicy | None = None
    max_migrations: int = DEFAULT_MAX_MIGRATIONS
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    event_stats: EventStats = field(default_factory=EventStats)
    prompt_stats: PromptStats = field(default_factory=PromptStats)
    role_flips: int = 0  # workers flipped between prefill and decode (set_plan) since start
    # Workers a plan change is retiring: no route names them; degraded serving passes them over.
    retiring: set[str] = field(default_factory=set)
    _ctx: zmq.asyncio.Context | None = None
    _event_tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    _routed: Counter = field(default_factory=Counter)  # worker id -> requests on a route through it, from pick to end

    def __post_init__(self) -> None:
        self.set_routes(self.routes)

    async def start(self, process_alive: dict | None = None) -> None:
        self._ctx = zmq.asyncio.Context()
        for info in self.workers:
            self._connect(info, (process_alive or {}).get(info.worker_id))

    def _connect(self, info: WorkerSpec, is_process_alive: Callable[[], bool] | None) -> WorkerClient:
        client = WorkerClient(info=info, ctx=self._ctx, health_interval_s=self.health_interval_s,
                              health_timeout_s=self.health_timeout_s, is_process_alive=is_process_alive)
        client.start()
        self.clients[info.worker_id] = client
        if info.kv_events_endpoint:
            feed = WorkerEventFeed(info.worker_id, info.kv_events_endpoint, self.prefix_index,
                                   is_healthy=lambda c=client: c.healthy, stats=self.event_stats)
            self._event_tasks[info.worker_id] = asyncio.ensure_future(feed.run(self._ctx))
        return client

    def add_worker(self, info: WorkerSpec, is_process_alive: Callable[[], bool] | None = None) -> WorkerClient:
        """A worker started while the router runs: its client (health checks begin) and its
        KV-events feed. No route names it until the next `set_plan`; `wait_healthy` on the
        client says when it answers."""
        if any(w.worker_id == info.worker_id for w in self.workers):
            raise ValueError(f"worker {info.worker_id!r} is already in the cluster")
        self.workers = [*self.workers, info]
        return self._connect(info, is_process_alive)

    def in_use(self, worker_id: str) -> bool:
        """Whether a request still needs the worker: on a route through it (picked, perhaps still
        prefilling elsewhere), or in flight on it."""
        client = self.clients.get(worker_id)
        return self._routed[worker_id] > 0 or (client is not None and client.num_inflight > 0)

    async def remove_worker(self, worker_id: str) -> None:
        """Let go of a worker no route names (retired, or a start that failed): its client is
        closed, its event feed cancelled, its prefix-index entries dropped."""
        if named := [f"{r.prefill_worker}->{r.decode_worker}" for r in self.routes
                     if worker_id in (r.prefill_worker, r.decode_worker)]:
            raise ValueError(f"worker {worker_id} is still on route(s) {named}; set routes without it first")
        self.workers = [w for w in self.workers if w.worker_id != worker_id]
        task = self._event_tasks.pop(worker_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        client = self.clients.pop(worker_id, None)
        if client is not None:
            await client.close()
        self.prefix_index.drop_worker(worker_id)
        self.retiring.discard(worker_id)

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.gather(*(c.wait_healthy(timeout_s) for c in self.clients.values()))

    async def close(self) -> None:
        tasks = list(self._event_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        clients = list(self.clients.values())
        results = await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for client, result in zip(clients, results):
            if isinstance(result, Exception):  # closing goes on for the others; say what failed
                log.warning("closing the client of worker %s failed", client.worker_id, exc_info=result)
        if self._ctx is not None:
            self._ctx.term()

    def set_routes(self, routes: list[Route]) -> None:
        """The routes and weights among this cluster's workers (at start, and for a live plan
        change): the policy is rebuilt, the next request uses them, requests in flight finish
        where they are."""
        self.policy = self._policy(routes)
        self.routes = list(routes)

    def _policy(self, routes: list[Route], known: set[str] | None = None) -> RoutePolicy:
        known = {w.worker_id for w in self.workers} if known is None else known
        for route in routes:
            for worker_id in (route.prefill_worker, route.decode_worker):
                if worker_id not in known:
                    raise ValueError(f"route {route.prefill_worker}->{route.decode_worker} names unknown worker {worker_id!r}")
        return make_policy(self.routing, routes, **self.policy_options)

    def check_plan(self, roles: dict[str, Role], routes: list[Route],
                   adding: list[WorkerSpec] = ()) -> dict[str, Role]:
        """The flips `roles` (worker id -> role) asks for, the whole change checked first, as if the
        workers `adding` had joined (plan_diff.check_roles_and_routes); a ValueError names the first problem."""
        specs = {w.worker_id: w for w in [*self.workers, *adding]}
        flips = check_roles_and_routes(specs, roles, routes)
        self._policy(routes, set(specs))  # what the policy itself refuses
        return flips

    def set_plan(self, roles: dict[str, Role], routes: list[Route]) -> dict[str, Role]:
        """New roles and routes together (POST /plan, the re-planning controller); returns the flips.

        Checked whole first (`check_plan`). Then each flipped worker's spec takes its
        new role, in `workers` and in its client, and the routes are set. Requests in
        flight finish where they are: a flipped worker finishes what it took under its
        old role (its kv_both connector sends and receives), which is its drain; the next
        request sees the new roles. The worker process keeps reporting the role it
        started with: it does nothing role-specific."""
        flips = self.check_plan(roles, routes)
        policy = self._policy(routes)
        for index, spec in enumerate(self.workers):
            if spec.worker_id in flips:
                spec = self.workers[index] = dataclasses.replace(spec, role=flips[spec.worker_id])
                if spec.worker_id in self.clients:
                    self.clients[spec.worker_id].info = spec
                log.info("worker %s flipped to %s", spec.worker_id, spec.role)
        self.role_flips += len(flips)
        self.policy, self.routes = policy, list(routes)
        return flips

    def _client(self, worker_id: str) -> WorkerClient:
        """A route's worker; one that left meanwhile (a drain timed out) fails the request over as if dead."""
        client = self.clients.get(worker_id)
        if client is None:
            raise WorkerUnavailable(f"worker {worker_id} has left the cluster")
        return client

    def is_healthy(self, worker_id: str) -> bool:
        return self.clients[worker_id].healthy

    def any_route_healthy(self) -> bool:
        return any(self.is_healthy(r.prefill_worker) and self.is_healthy(r.decode_worker) for r in self.routes)

    def _outstanding(self, worker_id: str) -> int:
        return self.clients[worker_id].outstanding_tokens

    def choose_route(self, prompt_token_ids: list[int] = (), exclude: frozenset[Route] = frozenset()) -> RouteChoice:
        cached = self.cached_tokens(prompt_token_ids) if self.policy.wants_prefixes else None
        return self.policy.pick(self.is_healthy, self._outstanding, exclude, len(prompt_token_ids), cached)

    def cached_tokens(self, prompt_token_ids: list[int]) -> dict[str, int]:
        """Each worker's cached prefix of the prompt, in tokens, from the prefix index."""
        chains: dict[int, list[int]] = {}  # block size -> keys: workers usually share one

        def chain(tokens, block_size: int) -> list[int]:
            if block_size not in chains:
                chains[block_size] = block_keys(tokens, block_size)
            return chains[block_size]

        # The last prompt token is always computed (its logits give the first output token).
        return self.prefix_index.cached_tokens(self.clients, prompt_token_ids[:-1], chain)

    def _choose(self, prompt_token_ids: list[int], tried: set[Route]) -> RouteChoice:
        try:
            return self.choose_route(prompt_token_ids, frozenset(tried))
        except NoRouteAvailable:
            if tried and self.any_route_healthy():
                return self.choose_route(prompt_token_ids)  # only the failed route is left and it recovered
            return self.degraded_choice(tried)

    def degraded_choice(self, tried: set[Route] = frozenset()) -> RouteChoice:
        """No healthy prefill->decode route: the least loaded healthy worker serves alone,
        a decode worker first (it is sized for generation), then colocated, then prefill."""
        failed_alone = {r.decode_worker for r in tried if r.prefill_worker == r.decode_worker}
        candidates = [c for c in self.clients.values()
                      if c.healthy and c.worker_id not in failed_alone and c.worker_id not in self.retiring]
        if not candidates:
            raise NoRouteAvailable("no healthy worker is available: every prefill->decode route and every worker is down")
        best = min(candidates, key=lambda c: (_DEGRADED_PREFERENCE[c.info.role], c.outstanding_tokens))
        self.prompt_stats.degraded_requests += 1
        log.info("no healthy route: worker %s serves a request alone (degraded)", best.worker_id)
        return RouteChoice(Route(best.worker_id, best.worker_id, 1.0))

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, on_retry=None,
    ) -> AsyncIterator[tuple[Route, proto.Output]]:
        """Yield (route, Output delta) until finished.

        A worker failure before any token is retried once on another route. A
        failure after tokens reached the client migrates the stream (up to
        `max_migrations` times): the tokens so far join the prompt, another
        route rebuilds the KV (prefill, or the decode worker itself) and the
        stream goes on where it stopped. Greedy output is then token-equal to an
        uninterrupted run; a sampled one continues with its seed on new state,
        and presence/frequency penalties count the earlier tokens as prompt.
        """
        tried: set[Route] = set()
        base_id = uuid.uuid4().hex[:16]
        generated: list[int] = []
        failures = migrations = 0
        while True:
            choice = self._choose(prompt_token_ids + generated, tried)
            tried.add(choice.route)
            request_id = f"{base_id}-{failures}" + (f"-m{migrations}" if migrations else "")
            try:
                async for output in self._run_on_route(choice, request_id, prompt_token_ids + generated,
                                                       _continued(sampling, len(generated))):
                    generated += output.token_ids
                    yield choice.route, output
                return
            except WorkerUnavailable as exc:
                if not generated:
                    failures += 1
                    if failures == MAX_ATTEMPTS:
                        raise
                    log.warning("retrying request on another route after: %s", exc)
                    if on_retry is not None:
                        on_retry()
                    continue
                if migrations == self.max_migrations:
                    raise
                migrations += 1
                self.prompt_stats.migrated_requests += 1
                log.warning("migrating a stream after %d tokens to another route after: %s", len(generated), exc)
                if len(generated) >= sampling.max_tokens:  # every token is out; only the finish was lost
                    yield choice.route, _finished_by_length(request_id)
                    return

    async def _run_on_route(
        self, choice: RouteChoice, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
    ) -> AsyncIterator[proto.Output]:
        route = choice.route
        # Counted from the pick (no await since) to the end: a plan change retires neither end before.
        ends = {route.prefill_worker, route.decode_worker}
        self._routed.update(ends)
        try:
            async for output in self._run_prefill_then_decode(choice, request_id, prompt_token_ids, sampling):
                yield output
        finally:
            self._routed.subtract(ends)

    async def _run_prefill_then_decode(
        self, choice: RouteChoice, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
    ) -> AsyncIterator[proto.Output]:
        route = choice.route
        kv_params = None
        # Where the prompt is computed: on P, or on D itself (colocated, decode-first).
        prompt_on_decode = choice.decode_first or route.prefill_worker == route.decode_worker
        if choice.decode_first:
            self.prompt_stats.decode_first_requests += 1
        prompt_logprobs = None  # computed by prefill when the client asked; decode's KV comes from elsewhere
        if not prompt_on_decode:
            prefill_final = await self._prefill(route, request_id, prompt_token_ids, sampling,
                                                self._decode_holds(choice))
            kv_params = decode_kv_params(prefill_final, self.kv_connector)
            if sampling.prompt_logprobs is not None:
                prompt_logprobs = prefill_final.prompt_logprobs if prefill_final is not None else None
                sampling = msgspec.structs.replace(sampling, prompt_logprobs=None)
        decode = self._client(route.decode_worker)
        budget = len(prompt_token_ids) + sampling.max_tokens
        decode.outstanding_tokens += budget
        first = True
        try:
            async for output in decode.generate(f"{request_id}-d", prompt_token_ids, sampling, kv_params):
                if first and prompt_on_decode:
                    self.prompt_stats.count(len(prompt_token_ids), output.num_cached_tokens)
                if first and prompt_logprobs is not None:
                    output.prompt_logprobs = prompt_logprobs
                first = False
                yield output
        finally:
            decode.outstanding_tokens -= budget

    def _decode_holds(self, choice: RouteChoice) -> int:
        """Leading prompt blocks the decode worker already holds (the prefix index's view when
        the route was chosen): prefill does not send them. Only with one block size on both
        ends, as the KV connector requires; if decode evicts them meanwhile it recomputes."""
        block_size = self.prefix_index.block_size(choice.route.decode_worker)
        if not choice.decode_cached_tokens or block_size is None:
            return 0
        if self.prefix_index.block_size(choice.route.prefill_worker) not in (None, block_size):
            return 0
        return choice.decode_cached_tokens // block_size

    async def _prefill(self, route: Route, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingParams, skip_blocks: int = 0) -> proto.Output | None:
        """Run the prompt on the route's prefill worker, its KV shipped to the
        route's decode worker (past the blocks it holds); the prefill's final output (the handoff)."""
        prefill = self._client(route.prefill_worker)
        decode_spec = self._client(route.decode_worker).info
        kv_params = prefill_kv_params(decode_spec, f"{request_id}-kv", self.kv_connector, skip_blocks)
        num_prompt = len(prompt_token_ids)
        prefill.outstanding_tokens += num_prompt
        final = None
        try:
            async for output in prefill.generate(f"{request_id}-p", prompt_token_ids,
                                                   prefill_sampling(sampling), kv_params):
                final = output
        finally:
            prefill.outstanding_tokens -= num_prompt
        if final is not None:
            self.prompt_stats.count(num_prompt, final.num_cached_tokens)
        return final
