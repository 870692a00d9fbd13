import statistics

import pytest

from common.traces import TraceRequest
from loadtest.workload import WorkloadConfig, build_workload, offered_rate_rps


def _trace(n=50, gap_s=1.0):
    return [TraceRequest(i * gap_s, 100 + i, 10 + i) for i in range(n)]


def test_replay_scales_time_and_bounds_count():
    w = build_workload(WorkloadConfig(arrival="trace", rate_scale=4.0, max_requests=10), _trace())
    assert len(w) == 10
    assert [r.arrival_s for r in w[:3]] == [0.0, 0.25, 0.5]
    assert (w[3].input_tokens, w[3].output_tokens) == (103, 13)


def test_replay_duration_bound_and_start_offset():
    w = build_workload(WorkloadConfig(arrival="trace", duration_s=5.0, start_s=10.0), _trace())
    assert len(w) == 5
    assert w[0].arrival_s == 0.0 and w[0].input_tokens == 110


def test_poisson_rate_is_close_to_asked():
    w = build_workload(WorkloadConfig(arrival="poisson", rate_rps=10.0, max_requests=4000,
                                      duration_s=1e6, input_len=8, output_len=4), None)
    assert offered_rate_rps(w) == pytest.approx(10.0, rel=0.06)
    assert all(r.input_tokens == 8 and r.output_tokens == 4 for r in w)


def test_gamma_burstiness_sets_gap_variability():
    def cv(burstiness):
        w = build_workload(WorkloadConfig(arrival="gamma", rate_rps=5.0, burstiness=burstiness,
                                          max_requests=3000, duration_s=1e6), _trace())
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(w, w[1:])]
        return statistics.pstdev(gaps) / statistics.mean(gaps)

    # CV of gamma gaps is 1/sqrt(shape): 2 for shape 0.25, 0.5 for shape 4.
    assert cv(0.25) == pytest.approx(2.0, rel=0.15)
    assert cv(4.0) == pytest.approx(0.5, rel=0.15)


def test_concurrency_mode_all_arrive_at_zero_and_lengths_cycle():
    w = build_workload(WorkloadConfig(arrival="concurrency", concurrency=3, max_requests=7), _trace(5))
    assert len(w) == 7 and all(r.arrival_s == 0 for r in w)
    assert w[5].input_tokens == 100


def test_clipping_and_zero_output():
    trace = [TraceRequest(0, 5000, 0), TraceRequest(1, 10, 900)]
    w = build_workload(WorkloadConfig(max_input_tokens=256, max_output_tokens=32), trace)
    assert [(r.input_tokens, r.output_tokens) for r in w] == [(256, 1), (10, 32)]


@pytest.mark.parametrize("kwargs, msg", [
    (dict(arrival="poisson"), "needs --rate"),
    (dict(arrival="concurrency"), "needs --concurrency"),
    (dict(max_requests=0), "bounded by a request count"),
    (dict(duration_s=0), "bounded in time"),
    (dict(rate_scale=-1), "rate_scale"),
    (dict(arrival="bogus"), "unknown"),
])
def test_bad_configs_explain_the_fix(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        WorkloadConfig(**kwargs)
