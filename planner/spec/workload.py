"""The workload: request length distribution, arrival rate, SLOs and an optional price budget.

Lengths come either as means (and optional standard deviation of the prompt,
which the attention term needs: its cost grows with the square of the prompt)
or from a trace file in one of the formats users bring: the Azure LLM traces
(``TIMESTAMP,ContextTokens,GeneratedTokens``), BurstGPT
(``Timestamp,Model,Request tokens,Response tokens,...``) and Mooncake JSONL
(``timestamp`` ms, ``input_length``, ``output_length``), read by the one trace
reader (``common.traces``) that the simulator and the load test use too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.traces import TRACE_FORMATS, TraceError, TraceRequest, detect_format, load_trace
from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields
WORKLOAD_FIELDS = frozenset(
    {"input_tokens_mean", "input_tokens_std", "output_tokens_mean", "trace", "arrival_rate_rps", "slo",
     "price_budget_per_hour"}
)


@dataclass(frozen=True, slots=True)
class TraceStats:
    num_requests: int
    span_s: float
    input_mean: float
    input_sq_mean: float
    output_mean: float

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

    @property
    def decode_context_mean(self) -> float:
        """Average context a decode step attends over: the prompt plus half the output."""
        return self.input_mean + self.output_mean / 2

    def to_json(self) -> dict:
        return {
            "input_tokens_mean": round(self.input_mean, 2),
            "output_tokens_mean": round(self.output_mean, 2),
            "arrival_rate_rps": self.arrival_rate_rps,
            "slo": {"ttft_ms": self.ttft_slo_s * 1e3, "tpot_ms": self.tpot_slo_s * 1e3},
            "price_budget_per_hour": self.price_budget_per_hour,
            "source": self.source,
        }


def trace_stats(requests: list[TraceRequest]) -> TraceStats:
    """Request count, span and length moments of a trace; requests without input or output are left out
    (BurstGPT logs failed requests with 0 response tokens)."""
    served = [r for r in requests if r.input_tokens > 0 and r.output_tokens > 0]
    if not served:
        raise ValueError("no request with positive input and output tokens")
    n = len(served)
    times = [r.arrival_s for r in served]
    return TraceStats(
        num_requests=n,
        span_s=max(times) - min(times),
        input_mean=sum(r.input_tokens for r in served) / n,
        input_sq_mean=sum(r.input_tokens ** 2 for r in served) / n,
        output_mean=sum(r.output_tokens for r in served) / n,
    )


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
    slo.check_keys({"ttft_ms", "tpot_ms"})
    ttft_s = slo.number("ttft_ms", above=0) / 1e3
    tpot_s = slo.number("tpot_ms", above=0) / 1e3
    rate = f.number("arrival_rate_rps", None, above=0)
    budget = f.number("price_budget_per_hour", None, above=0)
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
        stats = read_trace(path, tf.string("format", "auto", choices=("auto", *TRACE_FORMATS)))
        return Workload(
            input_mean=stats.input_mean,
            output_mean=stats.output_mean,
            input_sq_mean=stats.input_sq_mean,
            ttft_slo_s=ttft_s,
            tpot_slo_s=tpot_s,
            arrival_rate_rps=rate if rate is not None else stats.arrival_rate_rps,
            price_budget_per_hour=budget,
            source=f"trace:{path.name}",
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
    )
