"""The harness against a real HTTP server (the fake streaming server in a thread)."""

import json

import pytest

from common.ports import free_tcp_port
from loadtest.__main__ import main
from loadtest.metrics import summarize
from loadtest.prompts import PromptBuilder, load_tokenizer
from loadtest.runner import RunConfig, build_prompts, run
from loadtest.workload import WorkloadConfig, build_workload
from loadtest_fixtures import make_fake_server, tokenizer_dir  # noqa: F401 (pytest fixtures)


def _workload(tokenizer_dir, **kw):
    base = dict(arrival="poisson", rate_rps=200.0, max_requests=12, input_len=20, output_len=6)
    base.update(kw)
    w = build_workload(WorkloadConfig(**base), None)
    return w, build_prompts(PromptBuilder(load_tokenizer(tokenizer_dir), "ids"), w)


def test_open_loop_run_measures_the_fake_server(tokenizer_dir, make_fake_server):
    srv = make_fake_server(ttft_s=0.05, itl_s=0.01)
    w, prompts = _workload(tokenizer_dir)
    out = run(RunConfig(srv.url, duration_s=30, progress=False), w, prompts)
    assert out.model == "fake-model" and len(out.records) == 12
    s = summarize(out.records)
    assert s["completed"] == 12 and s["total_output_tokens"] == 72
    assert s["output_len_mismatches"] == 0 and s["input_len_mismatches"] == 0
    assert all(r.server_prompt_tokens == 20 for r in out.records)
    assert min(r.ttft_s for r in out.records) >= 0.05
    # Lower bounds only (the server cannot be faster than its sleeps); chunks may arrive
    # bunched on a busy machine, so single gaps are not bounded below.
    assert min(r.latency_s for r in out.records) >= 0.05 + 5 * 0.01
    assert all(len(r.itls_s) == 5 for r in out.records)
    body = srv.cfg.bodies[0]
    assert body["ignore_eos"] is True and body["max_tokens"] == body["min_tokens"] == 6
    assert isinstance(body["prompt"], list) and len(body["prompt"]) == 20
    assert body["stream"] is True


def test_chunks_without_usage_are_counted_by_text(tokenizer_dir, make_fake_server):
    srv = make_fake_server(usage_stats=False, short_by=2)
    w, prompts = _workload(tokenizer_dir, max_requests=3)
    out = run(RunConfig(srv.url, duration_s=30, progress=False), w, prompts)
    assert [r.output_tokens for r in out.records] == [4, 4, 4]
    assert summarize(out.records)["output_len_mismatches"] == 3


def test_a_token_that_decodes_to_a_unicode_line_separator_does_not_split_its_event(tokenizer_dir, make_fake_server):
    # JSON leaves U+2028 and U+0085 unescaped in a string; SSE ends lines at CR and LF only.
    # httpx's aiter_lines split there too, and the chunk failed as a protocol error.
    srv = make_fake_server(token_text="a\u2028b\x85{i}", ensure_ascii=False)
    w, prompts = _workload(tokenizer_dir, max_requests=3)
    out = run(RunConfig(srv.url, duration_s=30, progress=False), w, prompts)
    assert [(r.success, r.error, r.output_tokens) for r in out.records] == [(True, None, 6)] * 3


def test_http_errors_are_recorded_by_kind(tokenizer_dir, make_fake_server):
    srv = make_fake_server(fail_every=3)
    w, prompts = _workload(tokenizer_dir, max_requests=9)
    s = summarize(run(RunConfig(srv.url, duration_s=30, progress=False), w, prompts).records)
    assert s["completed"] == 6 and s["errors_by_kind"] == {"http_503": 3}


def test_connect_error_and_timeout(tokenizer_dir, make_fake_server):
    port = free_tcp_port()  # nothing listens there
    w, prompts = _workload(tokenizer_dir, max_requests=2)
    out = run(RunConfig(f"http://127.0.0.1:{port}", model="m", duration_s=5, progress=False), w, prompts)
    assert {r.error_kind for r in out.records} == {"connect"}

    slow = make_fake_server(ttft_s=5.0)
    out = run(RunConfig(slow.url, duration_s=5, request_timeout_s=0.3, progress=False), w, prompts)
    assert {r.error_kind for r in out.records} == {"timeout"}


def test_duration_and_drain_bound_the_run(tokenizer_dir, make_fake_server):
    srv = make_fake_server(ttft_s=0.01, itl_s=0.5)
    # 100 requests at 10/s would take 10 s to send; duration 0.5 s stops sending,
    # drain 0.5 s cancels what is still streaming.
    w, prompts = _workload(tokenizer_dir, rate_rps=10.0, max_requests=100, output_len=20)
    out = run(RunConfig(srv.url, duration_s=0.5, drain_s=0.5, progress=False), w, prompts)
    assert out.wall_s < 8.0  # unbounded, it would take > 19 s (sending 10 s + 10 s per stream)
    assert 1 <= len(out.records) <= 10 and out.not_sent == 100 - len(out.records)
    assert {r.error_kind for r in out.records} == {"cancelled"}


def test_closed_loop_keeps_concurrency(tokenizer_dir, make_fake_server):
    srv = make_fake_server(ttft_s=0.02, itl_s=0.005)
    w, prompts = _workload(tokenizer_dir, arrival="concurrency", concurrency=3, max_requests=15)
    out = run(RunConfig(srv.url, duration_s=30, concurrency=3, progress=False), w, prompts)
    assert len(out.records) == 15 and all(r.success for r in out.records)
    assert srv.cfg.peak_in_flight == 3


def test_cli_replays_a_trace_and_writes_json_and_plots(tokenizer_dir, make_fake_server, tmp_path):
    srv = make_fake_server()
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": 100 * i, "input_length": 600 + i,
                                           "output_length": 3, "hash_ids": [1, 2 + i]}) for i in range(6)))
    out = tmp_path / "res" / "run1"
    rc = main(["run", "--endpoint", srv.url, "--tokenizer", str(tokenizer_dir), "--trace", str(trace),
               "--prompt-format", "text", "--rate-scale", "10", "--slo-ttft-ms", "5000",
               "--slo-tpot-ms", "1000", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "res" / "run1.json").read_text())
    assert res["completed"] == 6 and res["slo_attainment"] == 1.0
    assert res["input_lens"] == [600 + i for i in range(6)]
    assert (tmp_path / "res" / "run1_latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "res" / "run1_timeline.png").stat().st_size > 1000
    tok = load_tokenizer(tokenizer_dir)
    prompts = [b["prompt"] for b in srv.cfg.bodies]
    assert [len(tok.encode(p)) for p in prompts] == [600 + i for i in range(6)]
    assert prompts[0][:200] == prompts[1][:200]  # shared hash id 1 -> shared prefix


def test_cli_compare_prints_ratios(tokenizer_dir, make_fake_server, tmp_path, capsys):
    fast, slow = make_fake_server(ttft_s=0.01), make_fake_server(ttft_s=0.2)
    rc = main(["compare", "--endpoint-a", fast.url, "--endpoint-b", slow.url, "--label-a", "fast",
               "--label-b", "slow", "--tokenizer", str(tokenizer_dir), "--arrival", "poisson", "--rate", "50",
               "--input-len", "16", "--output-len", "4", "--max-requests", "6", "--out", str(tmp_path / "cmp"),
               "--no-progress", "--no-plots"])
    assert rc == 0
    summary = json.loads((tmp_path / "cmp_compare.json").read_text())
    assert summary["ratios_b_over_a"]["mean_ttft_ms"] > 3
    assert "| mean TTFT (ms) |" in capsys.readouterr().out
    assert len(fast.cfg.bodies) == len(slow.cfg.bodies) == 6


def test_cli_bad_trace_exits_with_line_number(tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,-3,4\n")
    rc = main(["run", "--endpoint", "http://127.0.0.1:9", "--tokenizer", str(tokenizer_dir),
               "--trace", str(bad), "--no-progress"])
    assert rc == 2
    assert "bad.csv:2: ContextTokens is -3" in capsys.readouterr().err
