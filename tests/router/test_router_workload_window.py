"""The sliding window of the live workload (the 'watch' half of re-planning)."""

from __future__ import annotations

import pytest

from router.workload_window import WorkloadWindow


def test_window_figures_and_sliding():
    window = WorkloadWindow(window_s=10.0)
    for i in range(20):  # 2 requests/s for 10 s: prompts 100..1900, outputs 10
        window.record(100 * (i + 1), 10, ttft_s=0.05, tpot_s=0.01, now_s=i * 0.5)
    summary = window.summary(now_s=10.0)
    assert summary["requests"] == 20 and summary["requests_per_s"] == 2.0
    assert summary["prompt_tokens_p50"] == 1100 and summary["prompt_tokens_p90"] == 1800
    assert summary["output_tokens_mean"] == 10 and summary["ttft_ms_p50"] == pytest.approx(50)
    later = window.summary(now_s=15.0)  # the first half slid out
    assert later["requests"] == 10 and later["prompt_tokens_mean"] == 1550


def test_empty_window_and_bad_size():
    summary = WorkloadWindow().summary(now_s=0.0)
    assert summary["requests"] == 0 and summary["prompt_tokens_p50"] is None and summary["tpot_ms_p90"] is None
    with pytest.raises(ValueError, match="window_s=0"):
        WorkloadWindow(window_s=0)


def test_the_window_stays_bounded_when_nobody_reads_it():
    window = WorkloadWindow(window_s=10.0)
    for second in range(1000):
        window.record(100, 10, 0.1, 0.01, now_s=float(second))
    assert len(window._finished) <= 11  # the last 10 s, not every request since start


def test_length_spread_is_the_population_std():
    """The re-planning controller reads the spread of prompt and output lengths, not only their means."""
    window = WorkloadWindow(window_s=10.0)
    for prompt, output in ((100, 10), (300, 10), (200, 40), (400, 20)):
        window.record(prompt, output, ttft_s=None, tpot_s=None, now_s=1.0)
    summary = window.summary(now_s=2.0)
    assert summary["prompt_tokens_std"] == pytest.approx(111.803, abs=1e-3)  # sqrt(12500)
    assert summary["output_tokens_std"] == pytest.approx(12.247, abs=1e-3)  # sqrt(150)
    one = WorkloadWindow()
    one.record(50, 5, None, None, now_s=0.0)
    assert one.summary(now_s=0.0)["prompt_tokens_std"] == 0.0
    empty = WorkloadWindow().summary(now_s=0.0)
    assert empty["prompt_tokens_std"] is None and empty["output_tokens_std"] is None


def test_a_young_window_takes_its_rate_over_the_time_it_has_seen():
    window = WorkloadWindow(window_s=60.0)
    for i in range(10):
        window.record(100, 10, None, None, now_s=100.0 + i * 0.5)
    assert window.summary(now_s=105.0)["requests_per_s"] == 2.0  # 10 requests over 5 s, not over 60
    assert window.summary(now_s=200.0)["requests_per_s"] == 0.0  # they slid out
    later = WorkloadWindow(window_s=10.0)
    for i in range(40):
        later.record(100, 10, None, None, now_s=i * 0.5)
    assert later.summary(now_s=20.0)["requests_per_s"] == 2.0  # a full window: over the window


def test_the_window_measures_how_bursty_arrivals_are():
    from planner.core.observed import ObservedWorkload

    regular, bursty = WorkloadWindow(window_s=600), WorkloadWindow(window_s=600)
    for k in range(40):  # one request a second, each taking 2 s
        regular.record(100, 10, 0.1, 0.01, now_s=1000.0 + k + 2.0, latency_s=2.0)
    for k in range(40):  # bursts of 10 within 0.1 s, 10 s apart; finish order differs from arrival order
        arrived = 1000.0 + 10 * (k // 10) + 0.01 * (k % 10)
        bursty.record(100, 10, 0.1, 0.01, now_s=arrived + 5.0 - 0.1 * (k % 10), latency_s=5.0 - 0.1 * (k % 10))
    assert regular.summary(now_s=1100.0)["arrival_gap_cv2"] == pytest.approx(0.0, abs=1e-9)
    summary = bursty.summary(now_s=1100.0)
    assert summary["arrival_gap_cv2"] > 5
    assert ObservedWorkload.from_summary(summary).arrival_cv2 == pytest.approx(summary["arrival_gap_cv2"])
    few = WorkloadWindow()
    few.record(100, 10, 0.1, 0.01, now_s=1.0)
    assert few.summary(now_s=2.0)["arrival_gap_cv2"] is None  # too few gaps to say
