"""Prometheus metrics of one router, in its own registry (no module globals).

Per-worker series are labelled (worker, role); a worker that flips role loses its
series under the old label, and a worker that leaves the cluster (retired by a
live plan change) loses all of its series."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass
class RouterMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("hexserve_requests", "Requests by endpoint and outcome", ["endpoint", "status"], registry=r)
        self.retries = Counter("hexserve_request_retries", "Requests retried on another route after a worker failed", registry=r)
        self.ttft = Histogram("hexserve_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("hexserve_time_per_output_token_seconds", "Mean time per output token after the first", buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("hexserve_e2e_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("hexserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("hexserve_generation_tokens", "Tokens generated", registry=r)
        self.queue_waiting = Gauge("hexserve_admission_waiting", "Requests waiting for admission", registry=r)
        self.running = Gauge("hexserve_requests_running", "Requests admitted and running", registry=r)
        self.route_picks = Counter("hexserve_route_requests", "Requests sent along each route", ["prefill", "decode"], registry=r)
        labels = ["worker", "role"]
        self.worker_healthy = Gauge("hexserve_worker_healthy", "1 if the worker is in rotation", labels, registry=r)
        self.worker_running = Gauge("hexserve_worker_running_requests", "Requests running in the worker's scheduler", labels, registry=r)
        self.worker_inflight = Gauge("hexserve_worker_inflight_requests", "Requests the worker's control loop holds", labels, registry=r)
        self.worker_waiting = Gauge("hexserve_worker_waiting_requests", "Requests waiting in the worker's scheduler", labels, registry=r)
        self.worker_kv_usage = Gauge("hexserve_worker_kv_cache_usage", "Fraction of the worker's KV cache in use", labels, registry=r)
        self.worker_outstanding = Gauge("hexserve_worker_outstanding_tokens", "Tokens the router has outstanding on the worker", labels, registry=r)
        self.prefix_queries = Gauge("hexserve_worker_prefix_cache_queries_tokens", "Prompt tokens the worker's engine looked up in its prefix cache since it started (vLLM's count)", labels, registry=r)
        self.prefix_hits = Gauge("hexserve_worker_prefix_cache_hits_tokens", "Prompt tokens the worker's engine found in its prefix cache since it started (vLLM's count)", labels, registry=r)
        self.prompt_computed = Gauge("hexserve_prompt_computed_tokens", "Prompt tokens the engines computed (prompt minus their prefix-cache hits), over every prefill, colocated and decode-first run", registry=r)
        self.prompt_cached = Gauge("hexserve_prompt_cached_tokens", "Prompt tokens the engines' prefix caches supplied, over the same runs", registry=r)
        self.decode_first = Gauge("hexserve_decode_first_requests", "Requests the decode worker computed itself (its cache held all but a short suffix): no prefill hop", registry=r)
        self.degraded = Gauge("hexserve_degraded_requests", "Requests one worker served alone because no prefill->decode route was healthy", registry=r)
        self.migrated = Gauge("hexserve_migrated_requests", "Streams moved to another route after their decode worker failed mid-stream", registry=r)
        self.prefix_index_blocks = Gauge("hexserve_prefix_index_blocks", "Blocks the router's prefix index holds for the worker (from its KV-cache events)", labels, registry=r)
        self.kv_event_resets = Gauge("hexserve_kv_event_resets", "Times a worker's prefix-index entries were dropped, by reason", ["reason"], registry=r)
        self.observed = Gauge("hexserve_observed", "The live workload over the router's sliding window (GET /plan 'observed'): "
                              "requests/s, prompt and output token percentiles, TTFT/TPOT ms percentiles", ["figure"], registry=r)
        self.role_flips = Counter("hexserve_role_flips", "Workers flipped between prefill and decode by POST /plan "
                                  "(flexible workers, no restart)", registry=r)
        self._role_flips_seen = 0
        self._roles: dict[str, str] = {}  # worker id -> the role its per-worker series are labelled with
        self.kv_stat = Gauge("hexserve_kv_transfer", "KV transfer counters reported by the worker's connector (bytes, transfers, failures)", ["worker", "stat"], registry=r)
        self._kv_stats: dict[str, set[str]] = {}  # worker id -> the stats its kv_stat series hold
        self.workers_started = Counter("hexserve_workers_started", "Workers a live plan change started and saw healthy "
                                       "(new groups, and reshaped groups' new workers)", registry=r)
        self.workers_retired = Counter("hexserve_workers_retired", "Workers a live plan change drained and stopped for "
                                       "good (groups left out of the plan, reshaped groups' old workers)", registry=r)
        self.plan_changes = Counter("hexserve_plan_changes", "POST /plan changes by outcome: applied (routes and flips, "
                                    "at once), done or failed (workers started or retired in the background), refused",
                                    ["outcome"], registry=r)

    def observe_cluster(self, cluster) -> None:
        self.observe_workers(cluster.clients.values())
        stats = cluster.prompt_stats
        self.prompt_computed.set(stats.computed_tokens)
        self.prompt_cached.set(stats.cached_tokens)
        self.decode_first.set(stats.decode_first_requests)
        self.degraded.set(stats.degraded_requests)
        self.migrated.set(stats.migrated_requests)
        self.role_flips.inc(cluster.role_flips - self._role_flips_seen)
        self._role_flips_seen = cluster.role_flips
        for client in cluster.clients.values():
            self.prefix_index_blocks.labels(client.worker_id, client.info.role).set(
                cluster.prefix_index.num_blocks(client.worker_id))
        for reason, count in cluster.event_stats.resets.items():
            self.kv_event_resets.labels(reason).set(count)

    def observe_admission(self, admission) -> None:
        # Read when scraped: set only as requests were admitted, the gauges kept the count of the
        # last admission after every request had finished.
        self.running.set(admission.running)
        self.queue_waiting.set(admission.waiting)

    def observe_window(self, summary: dict) -> None:
        for figure, value in summary.items():
            if value is not None:
                self.observed.labels(figure).set(value)

    def _forget_old_role(self, worker_id: str, role: str) -> None:
        """A worker flipped to another role: its series under the old role label go, so that no
        stale series (a decode worker that is now prefill still 'healthy' as decode) remains."""
        old = self._roles.get(worker_id)
        self._roles[worker_id] = role
        if old is not None and old != role:
            self._remove_series(worker_id, old)

    def _remove_series(self, worker_id: str, role: str) -> None:
        for gauge in (self.worker_healthy, self.worker_running, self.worker_inflight, self.worker_waiting,
                      self.worker_kv_usage, self.worker_outstanding, self.prefix_queries, self.prefix_hits,
                      self.prefix_index_blocks):
            with contextlib.suppress(KeyError):  # a series never set (no load report yet)
                gauge.remove(worker_id, role)

    def _forget_gone_workers(self, worker_ids: set[str]) -> None:
        """Workers no longer in the cluster (retired by a plan change): every series of theirs goes."""
        for worker_id in [w for w in self._roles if w not in worker_ids]:
            self._remove_series(worker_id, self._roles.pop(worker_id))
            for stat in self._kv_stats.pop(worker_id, ()):
                with contextlib.suppress(KeyError):
                    self.kv_stat.remove(worker_id, stat)

    def observe_workers(self, clients) -> None:
        clients = list(clients)
        self._forget_gone_workers({client.worker_id for client in clients})
        for client in clients:
            labels = (client.worker_id, client.info.role)
            self._forget_old_role(*labels)
            self.worker_healthy.labels(*labels).set(1 if client.healthy else 0)
            self.worker_outstanding.labels(*labels).set(client.outstanding_tokens)
            load = client.load
            if load is None:
                continue
            self.worker_running.labels(*labels).set(load.num_running)
            self.worker_inflight.labels(*labels).set(load.num_inflight)
            self.worker_waiting.labels(*labels).set(load.num_waiting)
            self.worker_kv_usage.labels(*labels).set(load.kv_cache_usage)
            self.prefix_queries.labels(*labels).set(load.prefix_cache_queries)
            self.prefix_hits.labels(*labels).set(load.prefix_cache_hits)
            for stat, value in load.kv_stats.items():
                self.kv_stat.labels(client.worker_id, stat).set(value)
                self._kv_stats.setdefault(client.worker_id, set()).add(stat)

    def render(self) -> bytes:
        return generate_latest(self.registry)
