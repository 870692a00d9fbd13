"""The benchmarks still run: `make bench` names real modules, and the KV
throughput benchmark completes a tiny run over both links and writes its files."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest

from benchmarks import kvtransfer_throughput, run_all


def test_make_bench_runs_modules_that_exist():
    for bench in run_all.BENCHMARKS:
        assert importlib.util.find_spec(f"benchmarks.{bench.name}") is not None, bench.name
    assert len({b.name for b in run_all.BENCHMARKS}) == len(run_all.BENCHMARKS)


@pytest.mark.parametrize("name", [b.name for b in run_all.BENCHMARKS])
def test_every_benchmark_imports_and_has_a_main(name):
    """A module moved by a refactor breaks a benchmark's imports; this finds it without running it."""
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)


@pytest.mark.slow
def test_kv_throughput_benchmark_tiny_run_writes_its_table(tmp_path):
    kvtransfer_throughput.main(
        ["--tokens", "16", "--models", "Llama-3-8B", "--repeats", "1", "--min-gb", "0", "--links", "tcp", "ipc",
         "--results-dir", str(tmp_path)]
    )
    rows = json.loads((tmp_path / "kvtransfer_throughput.json").read_text())["rows"]
    assert [(r["link"], r["tokens"]) for r in rows] == [("tcp", 16), ("ipc", 16)]
    for row in rows:
        assert row["kv_bytes"] == 32 * 16 * 2 * 8 * 128 * 2  # layers x tokens x K/V x heads x dim x fp16
        assert set(row["gbps"]) == set(kvtransfer_throughput.VARIANTS)
        assert all(value > 0 for value in row["gbps"].values())
        assert all(sides["receiver"] > 0 for sides in row["cpu_s_per_gb"].values())
    table = (tmp_path / "kvtransfer_throughput.md").read_text()
    assert "| tcp | Llama-3-8B | 16 |" in table and "| ipc | Llama-3-8B | 16 |" in table
    assert "- ipc, connector path, xxh3:" in table and "- ipc, transport only, xxh3:" in table
    for row in rows:  # the connector path packs the 32 small layers into one message and loads them
        assert row["connector_messages"] == 1 and all(value > 0 for value in row["load_s"].values())


def test_loadtest_replay_refuses_an_unknown_target_before_starting_anything(capsys):
    from benchmarks import loadtest_replay

    with pytest.raises(SystemExit) as stopped:
        loadtest_replay.main(["--targets", "router,bogus"])
    assert stopped.value.code == 2 and "unknown 'bogus'" in capsys.readouterr().err


def test_colocated_interference_compares_the_mixed_step_with_its_two_parts():
    from benchmarks.colocated_interference import table_rows, with_ratios

    points = [{"batch": 0, "prompt_tokens": 128, "decode_ms": 0.0, "mixed_ms": 30.0},
              {"batch": 8, "prompt_tokens": 128, "decode_ms": 10.0, "mixed_ms": 60.0}]
    rated = with_ratios(points)
    assert rated[1]["prefill_ms"] == 30.0 and rated[1]["ratio"] == pytest.approx(1.5)  # 60 / (10 + 30)
    rows = table_rows([{"device": "SLOW", "cpu_cores": 0.3, "points": rated}])
    assert rows == [["SLOW (0.3 cores)", "8", "128", "10.0", "30.0", "60.0", "1.50"]]  # the batch-0 point is prefill(P)
