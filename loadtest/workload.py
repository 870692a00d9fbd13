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
served model accepts. Clipping keeps the front of a prompt (the prompt builder
cuts from the end), so a clipped request still shares its hash-id prefix.

Scaling Mooncake traces (`block_tokens`): a Mooncake hash id names a block of
512 prompt tokens, and its prompts (~15k tokens) do not fit a small model. With
`block_tokens = N` every hash id becomes a block of N tokens and every input
length becomes ceil(input_length * N / 512). Rounding up keeps the block count:
an input of length L spans ceil(L / 512) blocks of 512, and the scaled length
spans exactly ceil(L / 512) blocks of N (for L in ((h-1)*512, h*512], the
scaled length lies in ((h-1)*N, h*N]), so a request keeps all its hash ids and
its last block stays partial exactly when it was partial in the trace. Output
lengths are not scaled (use `max_output_tokens`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest

ARRIVALS = ("trace", "poisson", "gamma", "concurrency")


@dataclass(slots=True)
class PlannedRequest:
    index: int
    arrival_s: float  # offset from the start of the run
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    input_clipped: bool = False  # the trace (or --input-len) asked for more than max_input_tokens


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
    block_tokens: int = MOONCAKE_BLOCK_TOKENS  # tokens per hash-id block on the wire
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
        if isinstance(self.block_tokens, bool) or not isinstance(self.block_tokens, int) \
                or self.block_tokens < 1:
            raise ValueError(
                f"--block-tokens is {self.block_tokens!r}; it must be an integer >= 1 (tokens per "
                f"hash-id block; {MOONCAKE_BLOCK_TOKENS} replays a Mooncake trace unscaled)"
            )
        for name in ("input_len", "output_len", "max_input_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} is {value}; it must be >= 1")


def scaled_input_tokens(input_tokens: int, block_tokens: int) -> int:
    """A Mooncake input length with blocks of `block_tokens` instead of 512 (rounded up,
    which keeps the number of blocks; see the module docstring)."""
    return -(-input_tokens * block_tokens // MOONCAKE_BLOCK_TOKENS)


def scale_trace(trace: list[TraceRequest], block_tokens: int) -> list[TraceRequest]:
    """The trace with every input length scaled to blocks of `block_tokens`; refuses a
    trace without hash ids, whose lengths have no blocks to scale."""
    if block_tokens == MOONCAKE_BLOCK_TOKENS:
        return trace
    if not any(r.hash_ids for r in trace):
        raise ValueError(
            f"--block-tokens {block_tokens} scales a Mooncake trace's hash_ids blocks, and this "
            f"trace has no hash_ids; drop --block-tokens (or use --max-input-tokens to clip)"
        )
    return [TraceRequest(r.arrival_s, scaled_input_tokens(r.input_tokens, block_tokens),
                         r.output_tokens, r.hash_ids, r.line_no) for r in trace]


def _planned(cfg: WorkloadConfig, index: int, arrival_s: float, inp: int, out: int,
             hashes: tuple[int, ...]) -> PlannedRequest:
    """Fixed lengths override the trace's; then both are clipped to what the model accepts."""
    if cfg.input_len is not None:
        inp = cfg.input_len
    if cfg.output_len is not None:
        out = cfg.output_len
    clipped = cfg.max_input_tokens is not None and inp > cfg.max_input_tokens
    if cfg.max_input_tokens is not None:
        inp = min(inp, cfg.max_input_tokens)
    if cfg.max_output_tokens is not None:
        out = min(out, cfg.max_output_tokens)
    # A request with no prompt or no output cannot be timed (no TTFT).
    inp, out = max(cfg.min_input_tokens, inp), max(1, out)
    return PlannedRequest(index, arrival_s, inp, out, hashes, clipped)


def _from_trace_or_fixed(cfg: WorkloadConfig, trace: list[TraceRequest] | None, i: int, t_s: float):
    if trace:
        r = trace[i % len(trace)]
        return _planned(cfg, i, t_s, r.input_tokens, r.output_tokens, r.hash_ids)
    return _planned(cfg, i, t_s, cfg.input_len or 0, cfg.output_len or 0, ())


def build_workload(cfg: WorkloadConfig, trace: list[TraceRequest] | None) -> list[PlannedRequest]:
    """The bounded list of requests to send, sorted by arrival offset."""
    if trace is None and (cfg.input_len is None or cfg.output_len is None):
        raise ValueError("without --trace, give both --input-len and --output-len")
    if trace:
        trace = scale_trace(trace, cfg.block_tokens)
    elif cfg.block_tokens != MOONCAKE_BLOCK_TOKENS:
        raise ValueError(f"--block-tokens {cfg.block_tokens} scales a Mooncake --trace; there is none")
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
        out.append(_from_trace_or_fixed(cfg, trace, i, t_s))
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
        out.append(_planned(cfg, len(out), t_s, r.input_tokens, r.output_tokens, r.hash_ids))
    if not out:
        raise ValueError(f"no trace request falls after --start-s {cfg.start_s}")
    return out


def offered_rate_rps(workload: list[PlannedRequest]) -> float | None:
    """Mean arrival rate of an open-loop workload (None for closed loop or one request)."""
    if len(workload) < 2 or workload[-1].arrival_s <= 0:
        return None
    return (len(workload) - 1) / workload[-1].arrival_s
