"""Send a workload to one endpoint on schedule and collect the records.

Lifecycle of a run:

    build prompts (untimed) -> t0 -> for each request: wait for its arrival
    offset (open loop) or for a free slot (closed loop) -> send, stream, time
    -> at duration_s stop sending -> wait up to drain_s for in-flight requests
    -> cancel what is left (error_kind 'cancelled') -> records

Bounds: the workload is finite (max_requests), nothing is sent after
`duration_s`, and nothing runs past `duration_s + drain_s`; each request also
has its own timeout. Only the given endpoint is contacted, and redirects are
not followed, so a run cannot wander to another host.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from loadtest.client import build_payload, detect_model, normalize_base_url, send_request
from loadtest.metrics import RequestRecord
from loadtest.prompts import Prompt, PromptBuilder
from loadtest.workload import PlannedRequest


@dataclass(slots=True)
class RunConfig:
    endpoint: str
    model: str | None = None
    duration_s: float = 300.0
    drain_s: float = 60.0
    request_timeout_s: float = 120.0
    concurrency: int | None = None  # closed loop when set (and the cap for open loop)
    extra_body: dict = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        self.endpoint = normalize_base_url(self.endpoint)
        if self.duration_s <= 0 or self.drain_s < 0 or self.request_timeout_s <= 0:
            raise ValueError("duration_s and request_timeout_s must be > 0, drain_s >= 0")


@dataclass(slots=True)
class RunOutcome:
    records: list[RequestRecord]
    model: str
    endpoint: str
    wall_s: float
    not_sent: int  # workload requests skipped because duration_s had passed


def build_prompts(builder: PromptBuilder, workload: list[PlannedRequest]) -> list[Prompt]:
    return [builder.build(r.index, r.input_tokens, r.hash_ids) for r in workload]


async def run_async(
    cfg: RunConfig, workload: list[PlannedRequest], prompts: list[Prompt]
) -> RunOutcome:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, follow_redirects=False) as client:
        model = cfg.model or await detect_model(client, cfg.endpoint)
        return await _drive(cfg, client, model, workload, prompts)


async def _drive(cfg, client, model, workload, prompts) -> RunOutcome:
    bar = _progress(cfg, len(workload))
    slots = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task] = []
    not_sent = 0
    t0 = time.perf_counter()

    async def one(req: PlannedRequest, prompt: Prompt, record: RequestRecord) -> None:
        try:
            payload = build_payload(model, prompt.prompt, req.output_tokens, cfg.extra_body)
            await send_request(client, cfg.endpoint, payload, record, t0, cfg.request_timeout_s)
        finally:
            if slots:
                slots.release()
            if bar:
                bar.update(1)

    for req, prompt in zip(workload, prompts):
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(min(delay, max(0.0, cfg.duration_s - (time.perf_counter() - t0))))
        if slots:
            remaining = cfg.duration_s - (time.perf_counter() - t0)
            try:
                await asyncio.wait_for(slots.acquire(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                not_sent = len(workload) - len(records)
                break
        if time.perf_counter() - t0 >= cfg.duration_s:
            if slots:
                slots.release()
            not_sent = len(workload) - len(records)
            break
        record = RequestRecord(req.index, req.arrival_s, req.input_tokens, req.output_tokens)
        records.append(record)
        tasks.append(asyncio.create_task(one(req, prompt, record)))

    hard_stop_s = cfg.duration_s + cfg.drain_s - (time.perf_counter() - t0)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(hard_stop_s, 0.0))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    if bar:
        bar.close()
    return RunOutcome(records, model, cfg.endpoint, time.perf_counter() - t0, not_sent)


def _progress(cfg: RunConfig, total: int):
    if not cfg.progress:
        return None
    return tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)


def run(cfg: RunConfig, workload: list[PlannedRequest], prompts: list[Prompt]) -> RunOutcome:
    return asyncio.run(run_async(cfg, workload, prompts))
