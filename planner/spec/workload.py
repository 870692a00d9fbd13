"""The workload: request length distribution, arrival rate, SLOs and an optional price budget.

Lengths come either as means (and optional standard deviation of the prompt,
which the attention term needs: its cost grows with the square of the prompt)
or from a trace file in one of the formats users bring: the Azure LLM traces
(``TIMESTAMP,ContextTokens,GeneratedTokens``), BurstGPT
(``Timestamp,Model,Request tokens,Response tokens,...``) and Mooncake JSONL
(``timestamp`` ms, ``input_length``, ``output_length``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields

TRACE_FORMATS = ("auto", "azure", "burstgpt", "mooncake")
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


def _stats(times_s: list[float], inputs: list[int], outputs: list[int], path: Path) -> TraceStats:
    pairs = [(t, i, o) for t, i, o in zip(times_s, inputs, outputs) if i > 0 and o > 0]
    if not pairs:
        raise PlanInputError("workload.trace", f"{str(path)!r} has no request with positive input and output tokens")
    n = len(pairs)
    ts = [p[0] for p in pairs]
    return TraceStats(
        num_requests=n,
        span_s=max(ts) - min(ts),
        input_mean=sum(p[1] for p in pairs) / n,
        input_sq_mean=sum(p[1] ** 2 for p in pairs) / n,
        output_mean=sum(p[2] for p in pairs) / n,
    )


def _azure_time(text: str) -> float:
    # "2023-11-16 18:17:03.9799600": 7 fractional digits, more than %f takes.
    head, _, frac = text.strip().partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def _detect_format(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    header = [c.strip() for c in first.split(",")]
    if "ContextTokens" in header:
        return "azure"
    if "Request tokens" in header:
        return "burstgpt"
    raise PlanInputError(
        "workload.trace.format",
        f"cannot tell the format of {str(path)!r} from its first line; set format to one of: "
        f"{', '.join(TRACE_FORMATS[1:])}",
    )


def read_trace(path: Path, fmt: str = "auto") -> TraceStats:
    """Summarise a trace file: request count, span, length moments."""
    if not path.is_file():
        raise PlanInputError("workload.trace", f"trace file {str(path)!r} does not exist")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    times: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    try:
        if fmt == "mooncake":
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        row = json.loads(line)
                        times.append(float(row["timestamp"]) / 1e3)
                        inputs.append(int(row["input_length"]))
                        outputs.append(int(row["output_length"]))
        else:
            columns = {
                "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
                "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
            }[fmt]
            with open(path, encoding="utf-8", newline="") as fh:
                for row in csv.DictReader(fh):
                    stamp = row[columns[0]]
                    times.append(_azure_time(stamp) if fmt == "azure" else float(stamp))
                    inputs.append(int(float(row[columns[1]])))
                    outputs.append(int(float(row[columns[2]])))
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise PlanInputError(
            "workload.trace", f"{str(path)!r} is not a valid {fmt} trace ({type(exc).__name__}: {exc})"
        ) from None
    return _stats(times, inputs, outputs, path)


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
        stats = read_trace(path, tf.string("format", "auto", choices=TRACE_FORMATS))
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
