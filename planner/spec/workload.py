"""The workload: request length distribution, arrival rate, SLOs and an optional price budget.

Lengths come either as means (and optional standard deviation of the prompt,
which the attention term needs: its cost grows with the square of the prompt)
or from a trace file in one of the formats users bring: the Azure LLM traces
(``TIMESTAMP,ContextTokens,GeneratedTokens``), BurstGPT
(``Timestamp,Model,Request tokens,Response tokens,...``) and Mooncake JSONL
(``timestamp`` ms, ``input_length``, ``output_length``), read by the one trace
reader (``common.traces``) that the simulator and the load test use too.

The prompt-length distribution is kept as its percentiles (``input_quantiles``:
the 0.5th, 1.5th, ..., 99.5th), read off the trace or, from a mean and a
standard deviation, those of a log-normal with that mean and std (lengths are
positive and right-skewed; a std of 0 is every prompt at the mean). The TTFT
SLO is checked at ``slo.percentile`` of it (default 90) and the plan's SLO
attainment is the share of these percentiles whose TTFT meets it.

Arrivals: ``burstiness`` is the shape of gamma-distributed gaps between
requests, as ``vllm bench serve --burstiness`` and the load test define it
(1: Poisson, < 1: burstier, > 1: more regular); the gaps' squared coefficient
of variation is 1 / burstiness. A trace's own is read off its timestamps
unless the field is given. The planner's queueing (``planner.core.queueing``)
grows with it.

Prefix reuse (``prefix_hit_fraction``, default 0: none): the share of prompt
tokens the prefill workers' prefix caches hold. Prefill capacity is then
computed on the uncached tokens (``prefill_tokens_mean``, attending over the
cached ones: ``prefill_sq_mean``); the KV transfer, decode memory and the
TTFT-tail check keep the whole prompt (a tail prompt may miss). Give it as a
number, or as ``{"estimate": "affinity" | "upper-bound", "prefill_workers": N,
"cache_tokens_per_worker": C, "block_tokens": 512}`` to read it off the
trace's hash_ids (``planner.spec.prefix_reuse.reuse_profile``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from common.arrivals import gap_cv2
from common.traces import TRACE_FORMATS, TraceError, TraceRequest, detect_format, load_trace
from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields
from planner.spec.prefix_reuse import MOONCAKE_BLOCK_TOKENS, reuse_profile

DEFAULT_SLO_PERCENTILE = 90.0
# The probabilities (in %) at which a workload keeps its prompt-length percentiles: 100 equal slices.
QUANTILE_PROBS = tuple(k + 0.5 for k in range(100))

WORKLOAD_FIELDS = frozenset(
    {"input_tokens_mean", "input_tokens_std", "output_tokens_mean", "trace", "arrival_rate_rps", "slo",
     "price_budget_per_hour", "prefix_hit_fraction", "burstiness"}
)
MAX_PREFIX_HIT_FRACTION = 0.99  # at least one token of a prompt is always computed
REUSE_ESTIMATES = ("affinity", "upper-bound")


@dataclass(frozen=True, slots=True)
class TraceStats:
    num_requests: int
    span_s: float
    input_mean: float
    input_sq_mean: float
    output_mean: float
    input_quantiles: tuple[float, ...] = ()  # prompt lengths at QUANTILE_PROBS
    arrival_cv2: float = 1.0  # squared coefficient of variation of the gaps between arrivals

    @property
    def arrival_rate_rps(self) -> float:
        return self.num_requests / self.span_s if self.span_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Workload:
    input_mean: float
    output_mean: float
    input_sq_mean: float  # E[prompt^2], for the quadratic attention term
    ttft_slo_s: float
    tpot_slo_s: float
    arrival_rate_rps: float | None = None
    price_budget_per_hour: float | None = None
    source: str = "means"
    slo_percentile: float = DEFAULT_SLO_PERCENTILE  # TTFT is held at this percentile of the prompt length
    input_quantiles: tuple[float, ...] = ()  # prompt lengths at QUANTILE_PROBS (empty: every prompt at the mean)
    prefix_hit_fraction: float = 0.0  # share of prompt tokens found in the prefill workers' prefix caches
    trace_path: str | None = None  # the trace the figures were read from (None: means), and its format
    trace_format: str = "auto"
    arrival_cv2: float = 1.0  # squared CV of the gaps between arrivals (1: Poisson; 1 / burstiness)

    @property
    def prompt_cv2(self) -> float:
        """Squared coefficient of variation of the prompt length."""
        return max(0.0, self.input_sq_mean - self.input_mean**2) / self.input_mean**2

    @property
    def prefill_tokens_mean(self) -> float:
        """Prompt tokens a prefill computes on average: the uncached ones."""
        if not self.prefix_hit_fraction:
            return self.input_mean
        return self.input_mean * (1 - self.prefix_hit_fraction)

    @property
    def prefill_sq_mean(self) -> float:
        """Attention term of the uncached tokens, attending over the cached prefix too: the token pairs
        of a prompt n with a cached head h*n are n^2 - (h*n)^2."""
        if not self.prefix_hit_fraction:
            return self.input_sq_mean
        return self.input_sq_mean * (1 - self.prefix_hit_fraction**2)

    def input_at_percentile(self, percentile: float) -> float:
        """Prompt length at ``percentile`` (0-100) of the distribution, interpolated between slices."""
        if not self.input_quantiles:
            return self.input_mean
        return float(np.interp(percentile, QUANTILE_PROBS, self.input_quantiles))

    @property
    def input_tail(self) -> float:
        """The prompt length the TTFT SLO is checked at."""
        return self.input_at_percentile(self.slo_percentile)

    @property
    def decode_context_mean(self) -> float:
        """Average context a decode step attends over: the prompt plus half the output."""
        return self.input_mean + self.output_mean / 2

    def to_json(self) -> dict:
        return {
            "input_tokens_mean": round(self.input_mean, 2),
            "output_tokens_mean": round(self.output_mean, 2),
            "arrival_rate_rps": self.arrival_rate_rps,
            "slo": {"ttft_ms": self.ttft_slo_s * 1e3, "tpot_ms": self.tpot_slo_s * 1e3,
                    "percentile": self.slo_percentile},
            f"input_tokens_p{self.slo_percentile:g}": round(self.input_tail, 2),
            "price_budget_per_hour": self.price_budget_per_hour,
            "source": self.source,
            # Only when set: a plan without reuse stays byte-identical to one from before the field.
            **({"prefix_hit_fraction": round(self.prefix_hit_fraction, 4)} if self.prefix_hit_fraction else {}),
            # The gaps' squared CV (1 / burstiness; 0 for a perfectly regular trace), when not Poisson's.
            **({"arrival_cv2": round(self.arrival_cv2, 4)} if self.arrival_cv2 != 1.0 else {}),
        }


def trace_stats(requests: list[TraceRequest]) -> TraceStats:
    """Request count, span and length moments of a trace; requests without input or output are left out
    (BurstGPT logs failed requests with 0 response tokens)."""
    served = [r for r in requests if r.input_tokens > 0 and r.output_tokens > 0]
    if not served:
        raise ValueError("no request with positive input and output tokens")
    n = len(served)
    times = [r.arrival_s for r in served]
    cv2 = gap_cv2(times)
    return TraceStats(
        num_requests=n,
        span_s=max(times) - min(times),
        input_mean=sum(r.input_tokens for r in served) / n,
        input_sq_mean=sum(r.input_tokens ** 2 for r in served) / n,
        output_mean=sum(r.output_tokens for r in served) / n,
        input_quantiles=tuple(float(q) for q in np.percentile([r.input_tokens for r in served], QUANTILE_PROBS)),
        arrival_cv2=cv2 if cv2 is not None else 1.0,
    )


def lognormal_quantiles(mean: float, std: float) -> tuple[float, ...]:
    """Prompt lengths at QUANTILE_PROBS of the log-normal with this mean and std (all at the mean for std 0)."""
    if std <= 0:
        return ()
    sigma = math.sqrt(math.log(1 + (std / mean) ** 2))
    mu = math.log(mean) - sigma**2 / 2
    unit = NormalDist()
    return tuple(math.exp(mu + sigma * unit.inv_cdf(p / 100)) for p in QUANTILE_PROBS)


def read_trace(path: Path, fmt: str = "auto") -> TraceStats:
    """Summarise a trace file (read by ``common.traces``): request count, span, length moments."""
    if not path.is_file():
        raise PlanInputError("workload.trace", f"trace file {str(path)!r} does not exist")
    if fmt == "auto":
        try:
            fmt = detect_format(path)
        except TraceError as exc:
            raise PlanInputError("workload.trace.format", f"{exc}; or set format to one of: "
                                 f"{', '.join(TRACE_FORMATS)}") from None
    try:
        requests = load_trace(path, fmt)
    except TraceError as exc:  # it names the file, the line and the field
        raise PlanInputError("workload.trace", str(exc)) from None
    try:
        return trace_stats(requests)
    except ValueError as exc:
        raise PlanInputError("workload.trace", f"{str(path)!r} has {exc}") from None


def parse_workload(f: Fields, base_dir: Path) -> Workload:
    f.check_keys(WORKLOAD_FIELDS)
    slo = f.obj("slo")
    slo.check_keys({"ttft_ms", "tpot_ms", "percentile"})
    ttft_s = slo.number("ttft_ms", above=0) / 1e3
    tpot_s = slo.number("tpot_ms", above=0) / 1e3
    percentile = slo.number("percentile", DEFAULT_SLO_PERCENTILE, minimum=50, maximum=QUANTILE_PROBS[-1])
    rate = f.number("arrival_rate_rps", None, above=0)
    budget = f.number("price_budget_per_hour", None, above=0)
    burstiness = f.number("burstiness", None, above=0)
    if f.has("trace"):
        for key in ("input_tokens_mean", "output_tokens_mean", "input_tokens_std"):
            if f.has(key):
                raise PlanInputError(f.at(key), "give either a trace or length means, not both")
        trace = f.raw("trace")
        if isinstance(trace, str):
            trace = {"path": trace}
        tf = Fields(trace, f.at("trace"))
        tf.check_keys({"path", "format"})
        path = Path(tf.string("path"))
        path = path if path.is_absolute() else base_dir / path
        fmt = tf.string("format", "auto", choices=("auto", *TRACE_FORMATS))
        stats = read_trace(path, fmt)
        return Workload(
            input_mean=stats.input_mean,
            output_mean=stats.output_mean,
            input_sq_mean=stats.input_sq_mean,
            ttft_slo_s=ttft_s,
            tpot_slo_s=tpot_s,
            arrival_rate_rps=rate if rate is not None else stats.arrival_rate_rps,
            price_budget_per_hour=budget,
            source=f"trace:{path.name}",
            slo_percentile=percentile,
            input_quantiles=stats.input_quantiles,
            prefix_hit_fraction=parse_prefix_hit_fraction(f, (path, fmt)),
            trace_path=str(path), trace_format=fmt,
            arrival_cv2=1 / burstiness if burstiness is not None else stats.arrival_cv2,
        )
    mean_in = f.number("input_tokens_mean", above=0)
    std_in = f.number("input_tokens_std", 0.0, minimum=0)
    return Workload(
        input_mean=mean_in,
        output_mean=f.number("output_tokens_mean", above=0),
        input_sq_mean=mean_in**2 + std_in**2,
        ttft_slo_s=ttft_s,
        tpot_slo_s=tpot_s,
        arrival_rate_rps=rate,
        price_budget_per_hour=budget,
        slo_percentile=percentile,
        input_quantiles=lognormal_quantiles(mean_in, std_in),
        prefix_hit_fraction=parse_prefix_hit_fraction(f, None),
        arrival_cv2=1 / burstiness if burstiness is not None else 1.0,
    )


def parse_prefix_hit_fraction(f: Fields, trace: tuple[Path, str] | None) -> float:
    """``workload.prefix_hit_fraction``: a number, or an estimate from the trace's hash_ids (module docstring)."""
    key = "prefix_hit_fraction"
    if not f.has(key):
        return 0.0
    if not isinstance(f.raw(key), dict):
        return f.number(key, minimum=0, maximum=MAX_PREFIX_HIT_FRACTION)
    e = f.obj(key)
    e.check_keys({"estimate", "prefill_workers", "cache_tokens_per_worker", "block_tokens"})
    how = e.string("estimate", choices=REUSE_ESTIMATES)
    if trace is None:
        raise PlanInputError(e.at("estimate"), "an estimate reads the trace's hash_ids; give workload.trace "
                             "(a Mooncake-format trace) or a number")
    workers = e.integer("prefill_workers", minimum=1)
    block = e.integer("block_tokens", MOONCAKE_BLOCK_TOKENS, minimum=1)
    cache = e.integer("cache_tokens_per_worker", minimum=block)
    try:
        profile = reuse_profile(load_trace(*trace), workers, cache, block)
    except ValueError as exc:
        raise PlanInputError(f.at(key), str(exc)) from None
    hit = profile.affinity_hit_fraction if how == "affinity" else profile.repeat_fraction
    return min(hit, MAX_PREFIX_HIT_FRACTION)
