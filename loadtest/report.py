"""Result files and printed tables for runs, comparisons and simulations."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from loadtest.metrics import SLO, RequestRecord, summarize, timeline
from loadtest.plots import plot_result
from loadtest.prefix_cache import prefix_cache_lines

# (field, label, higher_is_better) for the printed tables and the compare ratios.
KEY_METRICS = (
    ("completed", "completed requests", True),
    ("failed", "failed requests", False),
    ("request_throughput", "request throughput (req/s)", True),
    ("output_throughput", "output throughput (tok/s)", True),
    ("total_token_throughput", "total token throughput (tok/s)", True),
    ("request_goodput", "goodput (req/s)", True),
    ("slo_attainment", "SLO attainment", True),
    ("mean_ttft_ms", "mean TTFT (ms)", False),
    ("p50_ttft_ms", "p50 TTFT (ms)", False),
    ("p90_ttft_ms", "p90 TTFT (ms)", False),
    ("p99_ttft_ms", "p99 TTFT (ms)", False),
    ("mean_tpot_ms", "mean TPOT (ms)", False),
    ("p50_tpot_ms", "p50 TPOT (ms)", False),
    ("p90_tpot_ms", "p90 TPOT (ms)", False),
    ("p99_tpot_ms", "p99 TPOT (ms)", False),
    ("mean_itl_ms", "mean ITL (ms)", False),
    ("p99_itl_ms", "p99 ITL (ms)", False),
    ("mean_e2el_ms", "mean E2E latency (ms)", False),
    ("p50_e2el_ms", "p50 E2E latency (ms)", False),
    ("p90_e2el_ms", "p90 E2E latency (ms)", False),
    ("p99_e2el_ms", "p99 E2E latency (ms)", False),
    # Engine-measured, from the endpoint's /metrics (loadtest/prefix_cache.py); prefill side.
    ("prefix_cache_hit_rate", "prefix-cache hit rate (engine-measured)", True),
    ("prefill_tokens_computed", "prefill tokens computed (engine-measured)", False),
)
ENGINE_MEASURED = ("prefix_cache_hit_rate", "prefill_tokens_computed")


def build_result(
    records: list[RequestRecord],
    slo: SLO,
    meta: dict,
    bin_s: float = 1.0,
    per_request: bool = True,
) -> dict:
    """The saved result: run metadata, the summary, and a timeline for plots."""
    result = {"date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"), **meta}
    result.update(summarize(records, slo, per_request=per_request))
    result["timeline"] = timeline(records, bin_s)
    return result


def output_prefix(out: str | Path) -> Path:
    """The prefix every output is named from: `--out results.json` and
    `--out results` both write results.json (and results_*.png), never
    results.json.json."""
    out = Path(out)
    return out.with_suffix("") if out.suffix == ".json" else out


def write_result(result: dict, out: str | Path, plots: bool = True) -> list[Path]:
    """`<prefix>.json`, and its plots `<prefix>_*.png`; `out` with or without `.json`."""
    out_prefix = output_prefix(out)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = out_prefix.with_name(out_prefix.name + ".json")
    json_path.write_text(json.dumps(result, indent=1, default=_jsonable))
    paths = [json_path]
    if plots and "ttfts" in result:
        paths += plot_result({result.get("label") or "run": result}, out_prefix)
    return paths


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _cell(result: dict, key: str) -> str:
    if key in ENGINE_MEASURED and result.get(key) is None and "prefix_cache" in result \
            and result["prefix_cache"] is None:
        return "not measured"
    return _fmt(result.get(key))


def summary_table(result: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key, label, _ in KEY_METRICS:
        if key in result:
            lines.append(f"| {label} | {_cell(result, key)} |")
    lines += prefix_cache_lines(result)
    for key in ("input_len_mismatches", "output_len_mismatches"):
        if result.get(key):
            lines.append(f"| {key.replace('_', ' ')} | {result[key]} |")
    if result.get("errors_by_kind"):
        lines.append(f"| errors by kind | {result['errors_by_kind']} |")
    return "\n".join(lines)


def ratio(a, b) -> float | None:
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    if a == 0 or math.isnan(a) or math.isnan(b):
        return None
    return b / a


def compare_table(a: dict, b: dict, label_a: str = "A", label_b: str = "B") -> str:
    """Side by side with the ratio B/A; the last column says which side is better."""
    lines = [f"| metric | {label_a} | {label_b} | {label_b}/{label_a} | better |", "|---|---|---|---|---|"]
    for key, label, higher in KEY_METRICS:
        if key not in a and key not in b:
            continue
        va, vb = a.get(key), b.get(key)
        r = ratio(va, vb)
        better = "-"
        if r is not None and r != 1.0:
            better = label_b if (r > 1) == higher else label_a
        lines.append(f"| {label} | {_cell(a, key)} | {_cell(b, key)} | {_fmt(r)} | {better} |")
    return "\n".join(lines)


def compare_ratios(a: dict, b: dict) -> dict[str, float | None]:
    return {key: ratio(a.get(key), b.get(key)) for key, _, _ in KEY_METRICS}
