"""The live workload over a sliding window: what the plan was made for, as it is now.

The plan was solved for one workload (arrival rate, prompt and output
lengths); real traffic drifts (the Azure code trace has 13x the prompt-to-output
ratio of the conversation trace). The runner records each finished request
here, and `GET /plan` and `/metrics` show the window: arrivals per second,
prompt and output length means, standard deviations and percentiles,
TTFT/TPOT percentiles, and how bursty the arrivals are (the gaps' CV²) (the prefix caches' share of prompt tokens is in
/metrics, hexserve_prompt_cached_tokens). This is the "watch" half of
re-planning; nothing here changes the plan.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from common.arrivals import gap_cv2

DEFAULT_WINDOW_S = 60.0


@dataclass(slots=True, frozen=True)
class _Finished:
    at_s: float  # monotonic
    arrived_s: float  # monotonic: when the request came in
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    tpot_s: float | None


def _std(values: list[float]) -> float | None:
    """Population standard deviation (the window is the whole population observed)."""
    if not values:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * (len(ordered) - 1) + 0.5))]


@dataclass(slots=True)
class WorkloadWindow:
    window_s: float = DEFAULT_WINDOW_S
    _finished: deque[_Finished] = field(default_factory=deque)
    _first_s: float | None = None  # when the first request finished: a young window's rate spans less

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s={self.window_s} must be > 0")

    def record(self, prompt_tokens: int, output_tokens: int, ttft_s: float | None, tpot_s: float | None,
               now_s: float | None = None, latency_s: float = 0.0) -> None:
        now_s = time.monotonic() if now_s is None else now_s
        if self._first_s is None:
            self._first_s = now_s
        self._finished.append(_Finished(now_s, now_s - latency_s, prompt_tokens, output_tokens, ttft_s, tpot_s))
        self._trim(now_s)  # bounded by the window whether or not anyone reads it

    def _trim(self, now_s: float) -> None:
        while self._finished and self._finished[0].at_s < now_s - self.window_s:
            self._finished.popleft()

    def _span_s(self, now_s: float) -> float:
        """Seconds the rate is taken over: the window, or less while the router is younger than it
        (since the first finished request; at least 1 s, so one request is not a burst)."""
        seen = now_s - self._first_s if self._first_s is not None else self.window_s
        return max(1.0, min(self.window_s, seen))

    def summary(self, now_s: float | None = None) -> dict:
        """The window's figures (None where no request finished in it)."""
        now_s = time.monotonic() if now_s is None else now_s
        self._trim(now_s)
        done = list(self._finished)
        prompts = [float(r.prompt_tokens) for r in done]
        outputs = [float(r.output_tokens) for r in done]
        ttfts = [r.ttft_s * 1e3 for r in done if r.ttft_s is not None]
        tpots = [r.tpot_s * 1e3 for r in done if r.tpot_s is not None]
        return {
            "window_s": self.window_s,
            "requests": len(done),
            "requests_per_s": len(done) / self._span_s(now_s),
            "prompt_tokens_mean": sum(prompts) / len(prompts) if prompts else None,
            "prompt_tokens_std": _std(prompts),
            "prompt_tokens_p50": _percentile(prompts, 50), "prompt_tokens_p90": _percentile(prompts, 90),
            "output_tokens_mean": sum(outputs) / len(outputs) if outputs else None,
            "output_tokens_std": _std(outputs),
            "output_tokens_p50": _percentile(outputs, 50), "output_tokens_p90": _percentile(outputs, 90),
            "ttft_ms_p50": _percentile(ttfts, 50), "ttft_ms_p90": _percentile(ttfts, 90),
            "tpot_ms_p50": _percentile(tpots, 50), "tpot_ms_p90": _percentile(tpots, 90),
            # How bursty the arrivals are (1: Poisson; common.arrivals), when enough requests finished.
            "arrival_gap_cv2": gap_cv2(r.arrived_s for r in done),
        }
