"""The workload a running cluster sees, as the planner reads it, and how far it is from a plan's.

The router keeps a sliding window of finished requests (`GET /plan`
"observed": arrivals per second, prompt and output length means and standard
deviations, the arrival gaps' CV²); the simulator keeps the same figures of its own clock. Both
become an `ObservedWorkload`, which turns into the planner's `Workload`
(prompt lengths log-normal with the observed mean and std, as for a cluster
file that gives means) with the SLOs of the workload the plan was made for.

Drift is the largest relative change among the arrival rate, the mean prompt
and the mean output: the code trace (2,048 prompt and 28 output tokens) and
the conversation trace (1,155 and 211) are 7.5x apart on the output mean.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from common.arrivals import gap_cv2
from planner.spec.workload import Workload, lognormal_quantiles


@dataclass(frozen=True, slots=True)
class ObservedWorkload:
    requests: int  # requests the figures are made of
    rate_rps: float
    prompt_mean: float
    output_mean: float
    prompt_std: float = 0.0
    # How the plan runs (the router's window; None where not measured): median TTFT and TPOT.
    ttft_ms_p50: float | None = None
    tpot_ms_p50: float | None = None
    arrival_cv2: float | None = None  # the gaps' squared CV over the window (None: too few to say)

    @classmethod
    def from_summary(cls, summary: dict[str, Any] | None) -> ObservedWorkload | None:
        """From the router's window (`GET /plan` "observed"); None when no request finished in it."""
        if not summary or not summary.get("requests") or summary.get("prompt_tokens_mean") is None:
            return None
        return cls(requests=int(summary["requests"]), rate_rps=float(summary["requests_per_s"]),
                   prompt_mean=float(summary["prompt_tokens_mean"]),
                   output_mean=float(summary["output_tokens_mean"]),
                   prompt_std=float(summary.get("prompt_tokens_std") or 0.0),
                   ttft_ms_p50=_number(summary.get("ttft_ms_p50")), tpot_ms_p50=_number(summary.get("tpot_ms_p50")),
                   arrival_cv2=_number(summary.get("arrival_gap_cv2")))

    @classmethod
    def of_requests(cls, lengths: list[tuple[int, int]], window_s: float,
                    arrivals_s: list[float] | None = None) -> ObservedWorkload | None:
        """From (prompt, output) token counts of the requests seen over `window_s` seconds (and their
        arrival times, for the burstiness)."""
        if not lengths or window_s <= 0:
            return None
        n = len(lengths)
        prompt_mean = sum(p for p, _ in lengths) / n
        prompt_var = sum((p - prompt_mean) ** 2 for p, _ in lengths) / n
        return cls(requests=n, rate_rps=n / window_s, prompt_mean=prompt_mean,
                   output_mean=sum(o for _, o in lengths) / n, prompt_std=math.sqrt(prompt_var),
                   arrival_cv2=gap_cv2(arrivals_s) if arrivals_s else None)

    def as_workload(self, base: Workload) -> Workload:
        """`base` (its SLOs, percentile and prefix reuse kept) with the observed lengths, rate and
        burstiness (base's where the window had too few requests to measure it)."""
        return dataclasses.replace(
            base, input_mean=self.prompt_mean, output_mean=max(1.0, self.output_mean),
            input_sq_mean=self.prompt_mean**2 + self.prompt_std**2,
            input_quantiles=lognormal_quantiles(self.prompt_mean, self.prompt_std),
            arrival_rate_rps=self.rate_rps if self.rate_rps > 0 else None, source="observed",
            arrival_cv2=self.arrival_cv2 if self.arrival_cv2 is not None else base.arrival_cv2)

    def to_json(self) -> dict[str, float | None]:
        return {"requests": self.requests, "rate_rps": round(self.rate_rps, 4),
                "prompt_mean": round(self.prompt_mean, 1), "prompt_std": round(self.prompt_std, 1),
                "output_mean": round(self.output_mean, 1), "ttft_ms_p50": self.ttft_ms_p50,
                "tpot_ms_p50": self.tpot_ms_p50,
                "arrival_cv2": None if self.arrival_cv2 is None else round(self.arrival_cv2, 3)}


def _number(value) -> float | None:
    return None if value is None else float(value)


def drift(observed: ObservedWorkload, reference: Workload) -> float:
    """Largest relative change of rate, mean prompt and mean output from `reference` (0: the same).

    A reference without an arrival rate (the plan was solved for capacity) is
    compared on lengths only."""
    pairs = [(observed.prompt_mean, reference.input_mean), (observed.output_mean, reference.output_mean)]
    if reference.arrival_rate_rps:
        pairs.append((observed.rate_rps, reference.arrival_rate_rps))
    return max(abs(now - then) / then for now, then in pairs if then > 0)
