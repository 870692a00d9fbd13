import pytest

from loadtest.metrics import SLO, RequestRecord, summarize, timeline
from loadtest.report import compare_ratios, compare_table


def _rec(i, start, ttft, itls, n=None, ok=True, kind=None):
    r = RequestRecord(i, start, 10, n or len(itls) + 1, start_s=start)
    if ok:
        r.ttft_s, r.itls_s = ttft, list(itls)
        r.latency_s = ttft + sum(itls)
        r.output_tokens = n or len(itls) + 1
        r.success = True
    else:
        r.error_kind, r.error = kind, "boom"
    return r


def test_summary_values_and_vllm_field_names():
    recs = [_rec(0, 0.0, 0.1, [0.02] * 4), _rec(1, 1.0, 0.3, [0.05] * 4), _rec(2, 1.5, 0, [], ok=False, kind="http_503")]
    s = summarize(recs, SLO(ttft_ms=200, tpot_ms=30))
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["errors_by_kind"] == {"http_503": 1}
    assert s["duration"] == pytest.approx(1.5)  # first send to last completion (1.0 + 0.5)
    assert s["request_throughput"] == pytest.approx(2 / 1.5)
    assert s["total_output_tokens"] == 10
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["mean_tpot_ms"] == pytest.approx(35.0)
    assert s["p50_itl_ms"] == pytest.approx(35.0)
    # Only request 0 meets both SLOs: goodput 1/1.5 req/s, attainment 1/3 (failures count).
    assert s["request_goodput"] == pytest.approx(1 / 1.5)
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    for key in ("ttfts", "itls", "latencies", "input_lens", "output_lens", "p99_e2el_ms", "median_tpot_ms"):
        assert key in s


def test_no_slo_means_no_goodput_and_mismatch_counted():
    r = _rec(0, 0.0, 0.1, [0.01] * 2, n=3)
    r.output_tokens_requested = 5
    s = summarize([r])
    assert s["request_goodput"] is None and s["slo_attainment"] is None
    assert s["output_len_mismatches"] == 1


def test_timeline_counts_tokens_and_in_flight():
    tl = timeline([_rec(0, 0.0, 0.5, [1.0, 1.0]), _rec(1, 0.2, 0.1, [])], bin_s=1.0)
    assert sum(tl["output_tokens_per_s"]) == pytest.approx(4)
    assert tl["in_flight"][0] == 2 and tl["in_flight"][2] == 1


def test_compare_ratio_and_better_column():
    a = {"request_throughput": 2.0, "mean_ttft_ms": 100.0}
    b = {"request_throughput": 3.0, "mean_ttft_ms": 50.0}
    assert compare_ratios(a, b)["request_throughput"] == pytest.approx(1.5)
    table = compare_table(a, b, "ours", "vllm")
    assert "| request throughput (req/s) | 2.000 | 3.000 | 1.500 | vllm |" in table
    assert "| mean TTFT (ms) | 100.0 | 50.0 | 0.500 | vllm |" in table
