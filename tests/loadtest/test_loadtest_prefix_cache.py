"""The engine-measured prefix-cache hit rate: /metrics parsing, before/after, the report."""

import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from common.ports import free_tcp_port
from loadtest.__main__ import main
from loadtest.prefix_cache import (
    metrics_url,
    parse_prefix_cache,
    prefix_cache_report,
    scrape_prefix_cache,
)
from loadtest.report import compare_table, summary_table
from loadtest_fixtures import make_fake_server, tokenizer_dir  # noqa: F401 (pytest fixtures)

HEXSERVE_TEXT = """\
# HELP hexserve_worker_prefix_cache_queries_tokens Prompt tokens looked up in the worker's prefix cache.
# TYPE hexserve_worker_prefix_cache_queries_tokens gauge
hexserve_worker_prefix_cache_queries_tokens{worker="p0",role="prefill"} {pq0}
hexserve_worker_prefix_cache_queries_tokens{worker="p1",role="prefill"} {pq1}
hexserve_worker_prefix_cache_queries_tokens{worker="d0",role="decode"} {dq}
# HELP hexserve_worker_prefix_cache_hits_tokens Prompt tokens found in the worker's prefix cache.
# TYPE hexserve_worker_prefix_cache_hits_tokens gauge
hexserve_worker_prefix_cache_hits_tokens{worker="p0",role="prefill"} {ph0}
hexserve_worker_prefix_cache_hits_tokens{worker="p1",role="prefill"} {ph1}
hexserve_worker_prefix_cache_hits_tokens{worker="d0",role="decode"} {dh}
# HELP hexserve_requests_total Requests.
# TYPE hexserve_requests_total counter
hexserve_requests_total 12.0
"""


def _hexserve(pq0, ph0, pq1, ph1, dq=0, dh=0):
    text = HEXSERVE_TEXT
    for k, v in dict(pq0=pq0, ph0=ph0, pq1=pq1, ph1=ph1, dq=dq, dh=dh).items():
        text = text.replace("{" + k + "}", f"{float(v)}")
    return text


def _vllm(queries_by_engine, hits_by_engine):
    """The exposition of a `vllm serve`, made the way vLLM makes it (prometheus_client counters
    named as in vllm/v1/metrics/loggers.py, labels model_name and engine)."""
    reg = CollectorRegistry()
    q = Counter("vllm:prefix_cache_queries", "queried tokens", ["model_name", "engine"], registry=reg)
    h = Counter("vllm:prefix_cache_hits", "cached tokens", ["model_name", "engine"], registry=reg)
    g = Gauge("vllm:num_requests_running", "running", ["model_name", "engine"], registry=reg)
    for engine, n in queries_by_engine.items():
        q.labels("m", engine).inc(n)
        h.labels("m", engine).inc(hits_by_engine[engine])
        g.labels("m", engine).set(3)
    return generate_latest(reg).decode()


def test_metrics_url_drops_v1():
    assert metrics_url("http://h:8000/v1") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/") == "http://h:8000/metrics"


def test_hexserve_series_give_per_role_deltas_and_prefill_tokens_computed():
    before = parse_prefix_cache(_hexserve(1000, 200, 500, 0, dq=40, dh=40))
    after = parse_prefix_cache(_hexserve(3000, 1200, 1500, 250, dq=90, dh=80))
    assert before.source == after.source == "hexserve"
    rep = prefix_cache_report(before, after)
    assert rep["prefix_cache"]["prefill"] == {"queries": 3000, "hits": 1250, "hit_rate": 1250 / 3000}
    assert rep["prefix_cache"]["decode"] == {"queries": 50, "hits": 40, "hit_rate": 0.8}
    # Prefill side only: the decode role's lookups are not prompt compute.
    assert rep["prefill_tokens_computed"] == 3000 - 1250
    assert rep["prefix_cache_hit_rate"] == pytest.approx(1250 / 3000)
    assert rep["prefix_cache_source"].startswith("hexserve /metrics")


def test_a_worker_that_restarted_counts_from_zero():
    before = parse_prefix_cache(_hexserve(1000, 200, 500, 100))
    after = parse_prefix_cache(_hexserve(300, 100, 800, 150))  # p0 restarted during the run
    rep = prefix_cache_report(before, after)
    assert rep["prefix_cache"]["prefill"]["queries"] == 300 + 300
    assert rep["prefix_cache"]["prefill"]["hits"] == 100 + 50


def test_plain_vllm_counters_are_the_fallback():
    before = parse_prefix_cache(_vllm({"0": 100}, {"0": 10}))
    after = parse_prefix_cache(_vllm({"0": 1100}, {"0": 410}))
    assert before.source == "vllm" and after.counts == {("colocated", "0"): [1100.0, 410.0]}
    rep = prefix_cache_report(before, after)
    assert rep["prefix_cache"] == {"colocated": {"queries": 1000, "hits": 400, "hit_rate": 0.4}}
    assert rep["prefill_tokens_computed"] == 600


def test_hexserve_series_win_over_vllm_ones_in_the_same_text():
    counts = parse_prefix_cache(_vllm({"0": 5}, {"0": 5}) + _hexserve(10, 1, 0, 0))
    assert counts.source == "hexserve"


@pytest.mark.parametrize("text", ["", "# nothing here\nhexserve_requests_total 3\n",
                                  "vllm:num_requests_running{engine=\"0\"} 1\n"])
def test_no_series_is_not_measured_and_never_estimated(text):
    rep = prefix_cache_report(parse_prefix_cache(text), parse_prefix_cache(text))
    assert rep["prefix_cache"] is None and rep["prefill_tokens_computed"] is None
    assert rep["prefix_cache_source"].startswith("not measured: the endpoint exports neither")
    table = summary_table({"completed": 3, **rep})
    assert "| prefix-cache hit rate (engine-measured) | not measured |" in table
    assert "| prefill tokens computed (engine-measured) | not measured |" in table


def test_unreachable_metrics_is_not_measured():
    counts = scrape_prefix_cache(f"http://127.0.0.1:{free_tcp_port()}/v1", timeout_s=2)
    assert counts.source is None and "failed" in counts.reason


def test_cli_run_reports_the_engine_measured_hit_rate(tokenizer_dir, make_fake_server, tmp_path, capsys):
    # The fake engine "finds" half of every prompt after the first in its cache.
    def metrics_text(cfg):
        lens = [len(b["prompt"]) for b in cfg.bodies]
        hits = sum(n // 2 for n in lens[1:])
        return _hexserve(5000 + sum(lens), 700 + hits, 0, 0)

    srv = make_fake_server(metrics_text=metrics_text)
    bare = make_fake_server()  # no /metrics: 404
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": 10 * i, "input_length": 1024 + 512 * i,
                                           "output_length": 3, "hash_ids": [1, 2, 3 + i]}) for i in range(4)))
    out = tmp_path / "cmp"
    rc = main(["compare", "--endpoint-a", srv.url, "--endpoint-b", bare.url, "--tokenizer", str(tokenizer_dir),
               "--trace", str(trace), "--block-tokens", "16", "--max-input-tokens", "40", "--out", str(out),
               "--no-progress", "--no-plots"])
    assert rc == 0
    lens = [len(b["prompt"]) for b in srv.cfg.bodies]
    assert lens == [32, 40, 40, 40]  # 1024 -> 32; 1536 -> 48 and 2048 -> 64, clipped to 40
    res = json.loads((tmp_path / "cmp_A.json").read_text())
    queries, hits = sum(lens), sum(n // 2 for n in lens[1:])
    assert res["prefix_cache"]["prefill"] == {"queries": queries, "hits": hits, "hit_rate": hits / queries}
    assert res["prefill_tokens_computed"] == queries - hits
    assert res["block_tokens"] == 16 and res["inputs_clipped"] == 3
    res_b = json.loads((tmp_path / "cmp_B.json").read_text())
    assert res_b["prefix_cache"] is None and "HTTP 404" in res_b["prefix_cache_source"]
    table = capsys.readouterr().out
    assert f"| prefix-cache hit rate (engine-measured) | {hits / queries:.3f} | not measured |" in table
    assert table == compare_table(res, res_b) + "\n"
