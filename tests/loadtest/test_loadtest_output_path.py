"""`--out` given with its `.json` extension is used as given (issue 18: it wrote results.json.json)."""

import json
from pathlib import Path

from loadtest.__main__ import main
from loadtest.report import output_prefix
from loadtest_fixtures import make_fake_server, tokenizer_dir  # noqa: F401 (pytest fixtures)


def test_output_prefix_drops_only_a_json_extension():
    assert output_prefix("out/results.json") == Path("out/results")
    assert output_prefix("out/results") == Path("out/results")
    assert output_prefix("out/run.v2") == Path("out/run.v2")  # a dot in a name is not an extension to drop


def test_run_out_with_json_extension_writes_that_file_and_its_plots(tokenizer_dir, make_fake_server, tmp_path, capsys):
    srv = make_fake_server(ttft_s=0.01)
    rc = main(["run", "--endpoint", srv.url, "--tokenizer", str(tokenizer_dir), "--arrival", "poisson",
               "--rate", "50", "--input-len", "16", "--output-len", "4", "--max-requests", "4",
               "--out", str(tmp_path / "results.json"), "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "results.json").read_text())["completed"] == 4
    assert not (tmp_path / "results.json.json").exists()
    assert (tmp_path / "results_latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "results_timeline.png").stat().st_size > 1000
    assert f"wrote {tmp_path / 'results.json'}" in capsys.readouterr().out


def test_compare_out_with_json_extension_names_outputs_from_the_stem(tokenizer_dir, make_fake_server, tmp_path):
    a, b = make_fake_server(ttft_s=0.01), make_fake_server(ttft_s=0.01)
    rc = main(["compare", "--endpoint-a", a.url, "--endpoint-b", b.url, "--tokenizer", str(tokenizer_dir),
               "--arrival", "poisson", "--rate", "50", "--input-len", "16", "--output-len", "4",
               "--max-requests", "3", "--out", str(tmp_path / "cmp.json"), "--no-progress", "--no-plots"])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"cmp_A.json", "cmp_B.json", "cmp_compare.json", "cmp_compare.md"}
