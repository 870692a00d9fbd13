"""The command line and the plan file: every example plans, exit codes, schema round trip, plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.plan import PLAN_SCHEMA, PLAN_SCHEMA_VERSION, load_plan, plan_from_json
from planner.__main__ import EXIT_BAD_INPUT, EXIT_INFEASIBLE, main
from planner_factories import CONFIGS, REPO, cluster_dict

EXAMPLES = sorted(p for p in CONFIGS.glob("*.json") if json.loads(p.read_text()).get("schema") == "hexserve.cluster")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_prints_a_plan(example, tmp_path, capsys):
    if "shared/traces" in example.read_text() and not (REPO.parent / "shared" / "traces").exists():
        pytest.skip("needs ../shared/traces")
    out = tmp_path / "plan.json"
    assert main(["solve", str(example), "--out", str(out), "--time-limit", "10"]) == 0
    printed = capsys.readouterr().out
    assert "throughput" in printed and "req/s" in printed and "g0" in printed
    plan = load_plan(out)
    assert plan.predicted.throughput_rps > 0 and plan.groups
    doc = json.loads(out.read_text())
    assert doc["schema"] == PLAN_SCHEMA and doc["schema_version"] == PLAN_SCHEMA_VERSION


def test_plan_round_trips_and_rejects_other_versions(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["solve", str(CONFIGS / "two_type_16.json"), "--out", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert plan_from_json(doc).to_json() == doc
    for key in ("groups", "routes", "predicted", "unused_gpus", "solver"):
        assert key in doc
    group = doc["groups"][0]
    for key in ("id", "role", "gpus", "tp", "pp", "layer_partition", "stages", "capacity_rps"):
        assert key in group
    assert {"prefill", "decode", "weight", "kv_gb_per_s"} <= set(doc["routes"][0])
    assert {"throughput_rps", "ttft_ms", "tpot_ms", "cost_per_hour", "tokens_per_dollar"} <= set(doc["predicted"])
    doc["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version"):
        plan_from_json(doc)


def test_plot_writes_a_png(tmp_path):
    png = tmp_path / "plan.png"
    assert main(["solve", str(CONFIGS / "four_type_64.json" if (REPO.parent / "shared" / "traces").exists()
                               else CONFIGS / "two_type_16.json"),
                 "--out", str(tmp_path / "p.json"), "--plot", str(png), "--quiet", "--time-limit", "5"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_exact_solver_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", str(CONFIGS / "small_exact_8.json"), "--solver", "exact", "--out", str(out)]) == 0
    exact = json.loads(out.read_text())
    assert exact["solver"]["name"] == "exact" and exact["solver"]["optimal"]
    capsys.readouterr()
    assert main(["solve", str(CONFIGS / "small_exact_8.json"), "--out", "", "--json", "--mode", "disaggregated"]) == 0
    heuristic = json.loads(capsys.readouterr().out)
    assert heuristic["predicted"]["throughput_rps"] >= 0.98 * exact["predicted"]["throughput_rps"]


def test_bad_input_exits_2_naming_the_field(tmp_path, capsys):
    data = cluster_dict()
    data["fleet"]["nodes"][0]["gpu_type"] = "H1000"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["solve", str(path), "--out", ""]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "fleet.nodes[0].gpu_type" in err and "known: A100-40G" in err


def test_infeasible_fleet_exits_3_with_the_shortfall(tmp_path, capsys):
    data = cluster_dict(nodes=[{"gpu_type": "T4", "num_gpus": 2}])
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data))
    assert main(["solve", str(path), "--out", ""]) == EXIT_INFEASIBLE
    assert "GiB short" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "planner", "catalog"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert "H100" in result.stdout and "Llama-2-70B" in result.stdout
    assert "https://lambda.ai/pricing, seen 2026-05-07" in result.stdout  # each price with its source
