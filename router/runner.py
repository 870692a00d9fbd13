"""Running a prepared request on the cluster: admission, metrics, and worker failures as API errors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vllm.sampling_params import SamplingParams

from common.routing import NoRouteAvailable
from engine import control_protocol as proto
from router.admission import Admission, AdmissionRejected
from router.cluster import Cluster
from router.metrics import RouterMetrics
from router.openai_schema import ApiError
from router.prepare import PreparedRequest
from router.worker_client import WorkerUnavailable
from router.workload_window import WorkloadWindow


@dataclass(slots=True)
class Completed:
    """A whole answer, for a non-streaming response."""

    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass(slots=True)
class _Timing:
    """One request's clock, for the TTFT, TPOT and latency histograms."""

    started: float  # perf_counter seconds
    first_token_at: float | None = None
    num_tokens: int = 0


@dataclass(slots=True)
class RequestRunner:
    cluster: Cluster
    admission: Admission
    metrics: RouterMetrics
    window: WorkloadWindow = field(default_factory=WorkloadWindow)

    def outputs(self, prep: PreparedRequest) -> AsyncIterator[proto.Output]:
        return self.stream(prep.prompt_token_ids, prep.sampling, prep.kind.metrics_label)

    async def stream(self, prompt_token_ids: list[int], sampling: SamplingParams,
                     label: str) -> AsyncIterator[proto.Output]:
        """The cluster's output deltas, with metrics (`label`: the endpoint); maps worker
        failures to API errors (429 when admission is full, 503 when no worker can serve)."""
        metrics = self.metrics
        timing = _Timing(started=time.perf_counter())
        status = "error"
        try:
            async with self.admission.slot():
                async with contextlib.aclosing(self.cluster.generate(prompt_token_ids, sampling,
                                                                     on_retry=metrics.retries.inc)) as stream:
                    async for route, output in stream:
                        if output.token_ids:
                            if timing.first_token_at is None:
                                timing.first_token_at = time.perf_counter()
                                metrics.ttft.observe(timing.first_token_at - timing.started)
                                metrics.route_picks.labels(route.prefill_worker, route.decode_worker).inc()
                            timing.num_tokens += len(output.token_ids)
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
            self._observe(label, len(prompt_token_ids), status, timing)

    def _observe(self, label: str, num_prompt_tokens: int, status: str, timing: _Timing) -> None:
        metrics = self.metrics
        metrics.requests.labels(label, status).inc()
        metrics.prompt_tokens.inc(num_prompt_tokens)
        metrics.generation_tokens.inc(timing.num_tokens)
        if status == "ok":
            finished_at = time.perf_counter()
            metrics.e2e.observe(finished_at - timing.started)
            tpot_s = None
            if timing.first_token_at is not None and timing.num_tokens > 1:
                tpot_s = (finished_at - timing.first_token_at) / (timing.num_tokens - 1)
                metrics.tpot.observe(tpot_s)
            ttft_s = None if timing.first_token_at is None else timing.first_token_at - timing.started
            self.window.record(num_prompt_tokens, timing.num_tokens, ttft_s, tpot_s,
                               latency_s=finished_at - timing.started)

    async def collect(self, prep: PreparedRequest) -> Completed:
        """The whole answer. Nothing reached the client yet, so a worker failing
        mid-generation is retried from the start once (cluster.generate already
        retried a failure that happened before the first token)."""
        for attempt in range(2):
            parts, token_ids, reason = [], [], None
            try:
                async with contextlib.aclosing(self.outputs(prep)) as stream:
                    async for output in stream:
                        parts.append(output.text)
                        token_ids.extend(output.token_ids)
                        reason = output.finish_reason or reason
                return Completed("".join(parts), token_ids, reason)
            except ApiError as exc:
                if exc.status_code != 503 or attempt == 1 or not token_ids:
                    raise
                self.metrics.retries.inc()
        raise AssertionError("unreachable")
