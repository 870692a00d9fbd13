"""The lab benchmark's baseline plans are what they claim to be."""

from __future__ import annotations

import json

import pytest

from benchmarks.lab_plans import homogeneous_document, majority_type, on_real_devices, replica_per_device, write_plans
from benchmarks.lab_report import report_markdown
from common.plan import plan_from_json
from lab.cluster_file import write_cluster_file
from lab.spec import load_lab
from planner.spec.cluster import parse_cluster

LAB = "configs/lab/hetero4.json"
WORKLOAD = {"input_tokens_mean": 370, "input_tokens_std": 240, "output_tokens_mean": 94,
            "slo": {"ttft_ms": 3000, "tpot_ms": 80}}


def test_homogeneous_assumption_retypes_every_host_and_the_plan_goes_back_to_real_devices(tmp_path):
    lab = load_lab(LAB)
    assert majority_type(lab) == "SLOW"
    document = homogeneous_document(lab, WORKLOAD)
    assert {n["gpu_type"] for n in document["fleet"]["nodes"]} == {"SLOW"}
    parse_cluster(document)  # a valid cluster file
    assumed = {"groups": [{"gpus": ["h0:0"], "gpu_types": {"SLOW": 1}, "stages": [{"node": "h0", "gpu_type": "SLOW"}]}]}
    real = on_real_devices(assumed, lab)
    assert real["groups"][0]["gpu_types"] == {"FAST": 1} and real["groups"][0]["stages"][0]["gpu_type"] == "FAST"
    assert assumed["groups"][0]["gpu_types"] == {"SLOW": 1}  # the input is left alone


def test_every_plan_is_written_and_readable_by_the_router(tmp_path):
    lab = load_lab(LAB)
    cluster = write_cluster_file(lab, tmp_path / "cluster.json", WORKLOAD)
    plans = write_plans(lab, cluster, WORKLOAD, tmp_path)
    assert sorted(plans) == ["distserve-like", "hexgen-like", "hexserve", "vllm-like"]
    read = {name: plan_from_json(json.loads(path.read_text())) for name, path in plans.items()}
    assert {g.role for g in read["hexgen-like"].groups} == {"colocated"}
    assert {g.role for g in read["distserve-like"].groups} == {"prefill", "decode"}
    assert [g.nodes for g in read["vllm-like"].groups] == [["h0"], ["h1"], ["h2"], ["h3"]]
    used = {n for g in read["distserve-like"].groups for n in g.nodes}
    types = {h.name: h.gpu_type for h in lab.hosts}
    for group in read["distserve-like"].groups:
        assert group.gpu_types == {types[group.nodes[0]]: 1}
    assert used <= set(types)
    assert len(replica_per_device(lab).groups) == 4


def test_report_names_the_best_baseline_ratio():
    run = lambda rps, att: {"measured": {"1": {"request_throughput": rps, "request_goodput": rps * att,
                                               "slo_attainment": att, "mean_ttft_ms": 100.0, "p90_ttft_ms": 1.0,
                                               "mean_tpot_ms": 50.0, "p90_tpot_ms": 1.0, "completed": 10,
                                               "failed": 0}},
                            "simulated": {"1": {"request_throughput": rps * 1.1, "slo_attainment": att,
                                                "mean_ttft_ms": 120.0, "mean_tpot_ms": 50.0}},
                            "plan": {"groups": [{"role": "prefill", "nodes": ["h1"]}]}}
    result = {"lab": {"name": "hx4", "hosts": [1, 2]}, "rate_scales": [1.0],
              "workload": {"requests": 10, "start_s": 0, "max_input_tokens": 768, "max_output_tokens": 128,
                           "slo_ttft_ms": 3000, "slo_tpot_ms": 80},
              "runs": {"hexserve": run(3.0, 0.95), "vllm-like": run(2.0, 0.95), "hexgen-like": run(4.0, 0.5)}}
    text = report_markdown(result, 0.9, lambda runs: max(r["request_throughput"] for r in runs.values()
                                                          if r["slo_attainment"] >= 0.9) if any(
        r["slo_attainment"] >= 0.9 for r in runs.values()) else 0.0, lambda s, m: (s - m) / m)
    assert "| hexserve | P@h1 | 3.00 | 1.50x |" in text  # hexgen-like met no SLO: vllm-like is the best baseline
    assert "+10 %" in text and "+20 %" in text
    # The error summary: over every rate, and (in brackets) over the rates served within the SLO.
    assert "| hexserve | 10 % (10 %) | 20 % (20 %) | 0 % (0 %) |" in text
    assert "| hexgen-like | 10 % (-) | 20 % (-) | 0 % (-) |" in text
    assert "Where the CPU went" not in text  # no rate recorded its CPU
    result["runs"]["hexserve"]["measured"]["1"]["cpu"] = {
        "busy_cores": 1.5, "machine_cores": 2.0, "worker_host_cores": 0.23, "other_cores": 0.45,
        "workers": {"h0/decode-g3": {"device_cores": 0.37, "quota_cores": 0.6}},
        "processes": {"router": {"cores": 0.13, "wait": 0.63}}}
    text = report_markdown(result, 0.9, lambda runs: 1.0, lambda s, m: (s - m) / m)
    assert "| hexserve | 1 | 1.50 of 2 | h0 0.37/0.6 | 0.23 | 0.13 (0.63) | 0.45 |" in text


def test_a_bad_workload_option_is_refused_before_the_lab_comes_up(monkeypatch, capsys):
    import benchmarks.lab_hetero as lab_hetero

    monkeypatch.setattr(lab_hetero, "up", lambda *a, **k: pytest.fail("the lab came up"))
    for argv, says in ((["--trace", "no-such-trace"], "--trace: trace 'no-such-trace' not found"),
                       (["--max-input-tokens", "0"], "--max-input-tokens 0: give a number above 0"),
                       (["--slo-tpot-ms", "-5"], "--slo-tpot-ms -5: give a number above 0"),
                       (["--burst-aware", "--requests", "5"], "--burst-aware: the 5 requests replayed have too few gaps")):
        with pytest.raises(SystemExit) as info:
            lab_hetero.main(argv)
        assert info.value.code == 2 and says in capsys.readouterr().err


def test_a_burst_aware_workload_gives_the_planner_the_replayed_requests_burstiness(tmp_path):
    from benchmarks.lab_hetero import Workload
    from common.arrivals import gap_cv2
    from common.traces import load_trace

    trace = tmp_path / "bursty.csv"
    # Three bursts of ten requests, 0.1 s apart inside a burst, 60 s between bursts.
    times = [burst * 60 + i * 0.1 for burst in range(3) for i in range(10)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     + "".join(f"2023-11-16 18:{int(t // 60):02d}:{t % 60:09.6f},100,10\n" for t in times))
    plain = Workload(trace=str(trace), requests=30).cluster_workload()
    aware = Workload(trace=str(trace), requests=30, burst_aware=True).cluster_workload()
    assert "burstiness" not in plain  # Poisson, as before
    expected = 1 / gap_cv2(r.arrival_s for r in load_trace(str(trace)))
    assert aware["burstiness"] == pytest.approx(expected) and aware["burstiness"] < 0.5
    assert {k: v for k, v in aware.items() if k != "burstiness"} == plain
