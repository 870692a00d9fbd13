"""Workloads: which requests to send, and when.

A workload is a finite list of `PlannedRequest`s (arrival offset, prompt and
output token counts, prefix hash ids). It is built from a trace and/or a
synthetic arrival process, then bounded by `max_requests` and `duration_s`, so
every run ends on its own:

- `trace`: replay the trace's own arrival times, divided by `rate_scale`.
- `poisson`: exponential gaps at `rate_rps`.
- `gamma`: gamma gaps with mean 1/`rate_rps` and shape `burstiness`
  (1 is Poisson, < 1 is burstier, > 1 is more regular; same meaning as
  `vllm bench serve --burstiness`).
- `concurrency`: closed loop, `concurrency` requests in flight at all times;
  arrival offsets are 0 and the runner holds requests back.

Lengths come from the trace in order (cycling if the synthetic process needs
more) or from fixed `input_len`/`output_len`; both can be clipped to what the
served model accepts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common.traces import TraceRequest

ARRIVALS = ("trace", "poisson", "gamma", "concurrency")


@dataclass(slots=True)
class PlannedRequest:
    index: int
    arrival_s: float  # offset from the start of the run
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class WorkloadConfig:
    arrival: str = "trace"
    rate_rps: float | None = None
    burstiness: float = 1.0
    concurrency: int | None = None
    rate_scale: float = 1.0
    start_s: float = 0.0  # skip this much of the trace first
    max_requests: int = 100
    duration_s: float = 300.0
    input_len: int | None = None
    output_len: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    min_input_tokens: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival {self.arrival!r} is unknown; use one of {ARRIVALS}")
        if self.arrival in ("poisson", "gamma") and not (self.rate_rps and self.rate_rps > 0):
            raise ValueError(f"arrival {self.arrival!r} needs --rate > 0 (requests per second)")
        if self.arrival == "gamma" and self.burstiness <= 0:
            raise ValueError("burstiness must be > 0 (1 = Poisson, < 1 = burstier)")
        if self.arrival == "concurrency" and not (self.concurrency and self.concurrency > 0):
            raise ValueError("arrival 'concurrency' needs --concurrency N >= 1")
        if self.rate_scale <= 0:
            raise ValueError(f"rate_scale is {self.rate_scale}; it must be > 0 (2 = twice as fast)")
        if self.max_requests < 1:
            raise ValueError("max_requests must be >= 1: every run is bounded by a request count")
        if not (self.duration_s > 0):
            raise ValueError("duration_s must be > 0: every run is bounded in time")
        for name in ("input_len", "output_len", "max_input_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} is {value}; it must be >= 1")


def _clip(cfg: WorkloadConfig, input_tokens: int, output_tokens: int) -> tuple[int, int]:
    if cfg.max_input_tokens is not None:
        input_tokens = min(input_tokens, cfg.max_input_tokens)
    if cfg.max_output_tokens is not None:
        output_tokens = min(output_tokens, cfg.max_output_tokens)
    # A request with no prompt or no output cannot be timed (no TTFT).
    return max(cfg.min_input_tokens, input_tokens), max(1, output_tokens)


def _lengths(cfg: WorkloadConfig, trace: list[TraceRequest] | None, i: int):
    if trace:
        r = trace[i % len(trace)]
        inp, out, hashes = r.input_tokens, r.output_tokens, r.hash_ids
    else:
        inp, out, hashes = cfg.input_len or 0, cfg.output_len or 0, ()
    if cfg.input_len is not None:
        inp = cfg.input_len
    if cfg.output_len is not None:
        out = cfg.output_len
    inp, out = _clip(cfg, inp, out)
    return inp, out, hashes


def build_workload(cfg: WorkloadConfig, trace: list[TraceRequest] | None) -> list[PlannedRequest]:
    """The bounded list of requests to send, sorted by arrival offset."""
    if trace is None and (cfg.input_len is None or cfg.output_len is None):
        raise ValueError("without --trace, give both --input-len and --output-len")
    if cfg.arrival == "trace":
        if not trace:
            raise ValueError("arrival 'trace' needs --trace")
        return _replay(cfg, trace)

    if trace and cfg.start_s > 0:
        trace = [r for r in trace if r.arrival_s >= cfg.start_s] or trace
    rng = random.Random(cfg.seed)
    out: list[PlannedRequest] = []
    t_s = 0.0
    for i in range(cfg.max_requests):
        if cfg.arrival == "concurrency":
            t_s = 0.0
        elif i > 0:
            if cfg.arrival == "poisson":
                t_s += rng.expovariate(cfg.rate_rps)
            else:
                # Mean gap 1/rate; shape sets the coefficient of variation 1/sqrt(shape).
                t_s += rng.gammavariate(cfg.burstiness, 1.0 / (cfg.rate_rps * cfg.burstiness))
        if t_s >= cfg.duration_s:
            break
        inp, outp, hashes = _lengths(cfg, trace, i)
        out.append(PlannedRequest(i, t_s, inp, outp, hashes))
    return out


def _replay(cfg: WorkloadConfig, trace: list[TraceRequest]) -> list[PlannedRequest]:
    out: list[PlannedRequest] = []
    base_s = None
    for r in trace:
        if r.arrival_s < cfg.start_s:
            continue
        base_s = r.arrival_s if base_s is None else base_s
        t_s = (r.arrival_s - base_s) / cfg.rate_scale
        if t_s >= cfg.duration_s or len(out) >= cfg.max_requests:
            break
        inp, outp = _clip(cfg, r.input_tokens, r.output_tokens)
        if cfg.input_len is not None:
            inp = cfg.input_len
        if cfg.output_len is not None:
            outp = cfg.output_len
        out.append(PlannedRequest(len(out), t_s, inp, outp, r.hash_ids))
    if not out:
        raise ValueError(f"no trace request falls after --start-s {cfg.start_s}")
    return out


def offered_rate_rps(workload: list[PlannedRequest]) -> float | None:
    """Mean arrival rate of an open-loop workload (None for closed loop or one request)."""
    if len(workload) < 2 or workload[-1].arrival_s <= 0:
        return None
    return (len(workload) - 1) / workload[-1].arrival_s
