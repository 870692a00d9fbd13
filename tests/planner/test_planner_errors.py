"""Inputs the planner cannot use, and SLOs no GPU meets: one line on stderr, never a traceback (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from planner.__main__ import EXIT_BAD_INPUT, EXIT_INFEASIBLE, main
from planner_factories import REPO, cluster_dict


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe{\x00}", "is not UTF-8 text (byte 0xff at offset 0); give a JSON file saved as UTF-8"),
    (b"fleet: [H100]\n", "is not valid JSON: line 1, column 1: Expecting value; fix the file there"),
], ids=["not-utf8", "not-json"])
def test_unreadable_cluster_file_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, content, expected):
    path = tmp_path / "cluster.json"
    path.write_bytes(content)
    assert main(["solve", str(path), "--out", ""]) == EXIT_BAD_INPUT
    line = _one_line_error(capsys)
    assert line == f"error: cluster file {str(path)!r} {expected}"


def test_a_folder_or_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["solve", str(tmp_path), "--out", ""]) == EXIT_BAD_INPUT
    assert _one_line_error(capsys) == f"error: {str(tmp_path)!r} is a folder; give the path of the cluster file itself"
    missing = tmp_path / "nope.json"
    assert main(["solve", str(missing), "--out", ""]) == EXIT_BAD_INPUT
    assert _one_line_error(capsys) == (f"error: cannot read cluster file {str(missing)!r}: No such file or directory; "
                                       "check the path")


def test_not_utf8_from_the_real_command_line(tmp_path):
    """The same through `python -m planner`: exit 2 and one stderr line, no UnicodeDecodeError traceback."""
    path = tmp_path / "latin1.json"
    path.write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    done = subprocess.run([sys.executable, "-m", "planner", "solve", str(path), "--out", ""], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip().splitlines() == [
        f"error: cluster file {str(path)!r} is not UTF-8 text (byte 0xe9 at offset 13); give a JSON file saved as UTF-8"]


def _write(tmp_path, slo: dict, **kwargs) -> str:
    data = cluster_dict(nodes=[{"gpu_type": "H100", "num_gpus": 8}], model="Llama-3-8B",
                        workload={"input_tokens_mean": 512, "output_tokens_mean": 128, "slo": slo}, **kwargs)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("mode", ["auto", "colocated", "disaggregated"])
def test_unreachable_ttft_names_the_slo_and_the_fastest_ttft(tmp_path, capsys, mode):
    path = _write(tmp_path, {"ttft_ms": 0.001, "tpot_ms": 100})
    assert main(["solve", path, "--out", "", "--mode", mode, "--time-limit", "5"]) == EXIT_INFEASIBLE
    line = _one_line_error(capsys)
    assert line.startswith("infeasible: workload.slo.ttft_ms: 0.001 ms cannot be met: the fastest group of this "
                           "fleet takes ")
    assert "to prefill the p90 prompt (512 tokens)" in line  # no std given: every prompt at the mean
    assert "memory" not in line and "TP/PP" not in line and "disaggregated" not in line
    fastest_ms = float(line.split("takes ")[1].split(" ms")[0])
    assert 0.001 < fastest_ms < 1000  # the floor is a real prefill time, well under the default SLO


def test_unreachable_tpot_names_the_slo_and_the_fastest_tpot(tmp_path, capsys):
    path = _write(tmp_path, {"ttft_ms": 2000, "tpot_ms": 0.001})
    assert main(["solve", path, "--out", "", "--time-limit", "5"]) == EXIT_INFEASIBLE
    line = _one_line_error(capsys)
    assert line.startswith("infeasible: workload.slo.tpot_ms: 0.001 ms cannot be met")
    assert "per output token even for a single request" in line


def test_unreachable_slo_with_the_exact_solver_and_under_a_budget(tmp_path, capsys):
    path = _write(tmp_path, {"ttft_ms": 0.001, "tpot_ms": 100})
    assert main(["solve", path, "--out", "", "--solver", "exact", "--time-limit", "10"]) == EXIT_INFEASIBLE
    assert _one_line_error(capsys).startswith("infeasible: workload.slo.ttft_ms: 0.001 ms cannot be met")
    assert main(["solve", path, "--out", "", "--budget", "20", "--time-limit", "5"]) == EXIT_INFEASIBLE
    assert _one_line_error(capsys).startswith("infeasible: workload.slo.ttft_ms: 0.001 ms cannot be met")


def test_calibrate_on_a_profile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_bytes(b"\x80")
    assert main(["calibrate", str(path)]) == EXIT_BAD_INPUT
    assert _one_line_error(capsys) == (f"error: {str(path)}: profile {str(path)!r} is not UTF-8 text (byte 0x80 at "
                                       "offset 0); give a JSON file saved as UTF-8")
