"""Per-request records and the summary schema shared by the harness and the simulator.

The summary's field names follow `vllm bench serve --save-result` where they
overlap (`duration`, `completed`, `request_throughput`, `output_throughput`,
`mean_ttft_ms`, `p99_tpot_ms`, `ttfts`, `itls`, ...), so a result file can be
read by the same scripts. Added fields: `p50`/`p90` everywhere, `slo_attainment`,
`errors_by_kind`, `output_len_mismatches`.

Definitions (as in vLLM):
- TTFT: send to first streamed token.
- TPOT: (latency - TTFT) / (output tokens - 1), for requests with > 1 token.
- ITL: gaps between consecutive streamed chunks.
- E2EL: send to last token.
- goodput: requests per second that succeeded and met every given SLO.
- SLO attainment: the share of all requests (failures count as misses) that met them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    index: int
    arrival_s: float  # when the workload wanted it sent, from the run start
    input_tokens: int
    output_tokens_requested: int
    start_s: float = 0.0  # when it was actually sent
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None  # end-to-end, from start_s
    itls_s: list[float] = field(default_factory=list)
    success: bool = False
    error_kind: str | None = None
    error: str | None = None
    route: str | None = None  # the simulator names the prefill->decode route
    server_prompt_tokens: int | None = None  # the prompt length the server reported (usage)

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2 or self.ttft_s is None or self.latency_s is None:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float | None:
        return None if self.latency_s is None else self.start_s + self.latency_s

    def token_times_s(self) -> list[float]:
        """Absolute times (from the run start) at which streamed chunks arrived."""
        if self.ttft_s is None:
            return []
        t = self.start_s + self.ttft_s
        out = [t]
        for gap in self.itls_s:
            t += gap
            out.append(t)
        return out


@dataclass(slots=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.success:
            return False
        if self.ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1e3 > self.ttft_ms):
            return False
        tpot = r.tpot_s or 0.0
        if self.tpot_ms is not None and tpot * 1e3 > self.tpot_ms:
            return False
        if self.e2el_ms is not None and (r.latency_s is None or r.latency_s * 1e3 > self.e2el_ms):
            return False
        return True

    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


def _stats(name: str, values_s: list[float]) -> dict[str, float | None]:
    if not values_s:  # e.g. no successful request, or a simulation without ITLs
        keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
        return {k: None for k in keys + [f"p{p}_{name}_ms" for p in PERCENTILES]}
    arr = np.asarray(values_s, dtype=float) * 1e3
    out = {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def max_concurrency(records: list[RequestRecord]) -> int:
    events = []
    for r in records:
        if r.end_s is not None:
            events.append((r.start_s, 1))
            events.append((r.end_s, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def summarize(
    records: list[RequestRecord],
    slo: SLO | None = None,
    duration_s: float | None = None,
    per_request: bool = True,
) -> dict:
    """The result dict; `duration_s` defaults to first send to last completion."""
    slo = slo or SLO()
    ok = [r for r in records if r.success]
    if duration_s is None:
        ends = [r.end_s for r in records if r.end_s is not None]
        starts = [r.start_s for r in records]
        duration_s = (max(ends) - min(starts)) if ends and starts else 0.0
    result = _counts(records, ok, slo, duration_s)
    result.update(_stats("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]))
    result.update(_stats("tpot", [t for r in ok if (t := r.tpot_s) is not None]))
    result.update(_stats("itl", [g for r in ok for g in r.itls_s]))
    result.update(_stats("e2el", [r.latency_s for r in ok if r.latency_s is not None]))
    result.update(_stats("client_queue_time", [max(0.0, r.start_s - r.arrival_s) for r in records]))
    if per_request:
        result.update({
            "input_lens": [r.input_tokens for r in records],
            "output_lens": [r.output_tokens for r in records],
            "ttfts": [r.ttft_s or 0.0 for r in records],
            "itls": [r.itls_s for r in records],
            "latencies": [r.latency_s or 0.0 for r in records],
            "start_times": [r.start_s for r in records],
            "errors": [r.error or "" for r in records],
        })
    return result


def _counts(records: list[RequestRecord], ok: list[RequestRecord], slo: SLO, duration_s: float) -> dict:
    """Request and token counts, throughputs over `duration_s`, SLO attainment and errors by kind."""
    dur = duration_s if duration_s > 0 else float("nan")
    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(1 for r in records if slo.met(r))
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            errors[r.error_kind or "unknown"] = errors.get(r.error_kind or "unknown", 0) + 1
    return {
        "duration": duration_s,
        "num_prompts": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": (good / dur) if slo.is_set() else None,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2el_ms": slo.e2el_ms},
        "slo_attainment": (good / len(records)) if (slo.is_set() and records) else None,
        "errors_by_kind": errors,
        "output_len_mismatches": sum(
            1 for r in ok if r.output_tokens != r.output_tokens_requested
        ),
        # The server counted a different prompt length than we built: the tokenizer
        # given is not the served model's, or a text prompt did not round-trip.
        "input_len_mismatches": sum(
            1 for r in ok
            if r.server_prompt_tokens is not None and r.server_prompt_tokens != r.input_tokens
        ),
        "max_concurrent_requests": max_concurrency(records),
    }


def timeline(records: list[RequestRecord], bin_s: float = 1.0) -> dict[str, list[float]]:
    """Per-bin output tokens/s, completed requests/s and in-flight requests, for plots."""
    ends = [r.end_s for r in records if r.end_s is not None]
    horizon_s = max(ends + [r.arrival_s for r in records] + [bin_s])
    n = int(np.ceil(horizon_s / bin_s)) + 1
    tokens = np.zeros(n)
    done = np.zeros(n)
    in_flight = np.zeros(n)
    waiting = np.zeros(n)
    for r in records:
        times = r.token_times_s()
        if r.success and times:
            # Chunks can carry several tokens; spread the count evenly over them.
            per_chunk = r.output_tokens / len(times)
            for t in times:
                tokens[min(n - 1, int(t / bin_s))] += per_chunk
        if r.success and r.end_s is not None:
            done[min(n - 1, int(r.end_s / bin_s))] += 1
        end = r.end_s if r.end_s is not None else r.start_s
        for b in range(int(r.start_s / bin_s), min(n, int(end / bin_s) + 1)):
            in_flight[b] += 1
        for b in range(int(r.arrival_s / bin_s), min(n, int(r.start_s / bin_s))):
            waiting[b] += 1
    return {
        "t_s": [i * bin_s for i in range(n)],
        "output_tokens_per_s": list(tokens / bin_s),
        "requests_per_s": list(done / bin_s),
        "in_flight": list(in_flight),
        "client_queued": list(waiting),
    }
