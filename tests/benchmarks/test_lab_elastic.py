"""The lab elastic benchmark's trace, plans and per-phase accounting (no lab needed)."""

from __future__ import annotations

import json

from benchmarks.lab_elastic import MAX_INPUT, MAX_OUTPUT, Phase, per_phase, plan_for, write_trace
from common.traces import load_trace
from lab.spec import load_lab

PHASES = [Phase("conversation", "azure-conv", 2.0, 30.0), Phase("code", "azure-code", 6.0, 20.0)]


def test_the_shifting_trace_has_each_phase_at_its_rate_and_lengths(tmp_path):
    rows = write_trace(PHASES, tmp_path / "shift.jsonl")
    read = load_trace(str(tmp_path / "shift.jsonl"))
    assert len(read) == len(rows)
    first = [r for r in rows if r["timestamp"] < 30_000]
    second = [r for r in rows if r["timestamp"] >= 30_000]
    assert 30 <= len(first) <= 90 and 80 <= len(second) <= 160  # Poisson around 60 and 120
    assert all(r["input_length"] <= MAX_INPUT and 1 <= r["output_length"] <= MAX_OUTPUT for r in rows)
    mean_out = [sum(r["output_length"] for r in part) / len(part) for part in (first, second)]
    assert mean_out[0] > 2 * mean_out[1]  # conversation answers are long, code answers short
    assert rows == write_trace(PHASES, tmp_path / "again.jsonl")  # the same seed, the same requests


def test_per_phase_counts_goodput_by_the_slos_and_failures():
    # Sent at 0, 10 (conversation) and 35, 40 (code): one misses TTFT, one TPOT, one fails.
    result = {"start_times": [100.0, 110.0, 135.0, 140.0], "ttfts": [0.5, 4.0, 0.2, 0.0],
              "latencies": [1.5, 6.0, 2.2, 0.0], "output_lens": [21, 21, 11, 0],
              "errors": ["", "", "", "worker lost"]}
    rows = {r["phase"]: r for r in per_phase(result, PHASES)}
    assert rows["conversation"]["requests"] == 2 and rows["conversation"]["goodput_rps"] == round(1 / 30, 3)
    assert rows["code"]["requests"] == 2 and rows["code"]["failed"] == 1
    assert rows["code"]["goodput_rps"] == 0.0  # 2 s over 10 tokens: 200 ms TPOT misses 80 ms
    assert rows["all"]["requests"] == 4 and rows["all"]["slo_attainment"] == 0.25


def test_the_plan_for_each_phase_is_disaggregated_on_the_lab_hosts(tmp_path):
    lab = load_lab("configs/lab/elastic4.json")
    cluster, plan = plan_for(lab, PHASES[0], tmp_path)
    document = json.loads(plan.read_text())
    assert document["mode"] == "disaggregated"
    assert {n for g in document["groups"] for n in g["nodes"]} <= {h.name for h in lab.hosts}
    assert json.loads(cluster.read_text())["workload"]["arrival_rate_rps"] == 2.0


def test_options_it_cannot_honour_are_refused_before_the_lab_comes_up(capsys):
    import pytest

    from benchmarks.lab_elastic import main

    for argv, says in ((["--arms", "static,foo"], "--arms: unknown foo"), (["--code-rps", "0"], "--code-rps 0"),
                       (["--profiles", "/nonexistent"], "no profile for FAST, SLOW")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
