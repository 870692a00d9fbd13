"""benchmarks.prefix_routing_sim simulates the requests benchmarks.prefix_routing sends: the same list
the load-test CLI builds from that benchmark's flags (arrivals, clipped lengths, scaled hash ids)."""

from __future__ import annotations

import argparse

import pytest

import loadtest.__main__ as loadtest_cli
from benchmarks import prefix_routing, prefix_routing_sim


@pytest.mark.parametrize("trace", ["mooncake", "azure-conv"])
def test_requests_equal_what_the_load_test_cli_builds(trace, monkeypatch):
    bench_args = argparse.Namespace(requests=40, rate_scale=0.5, start_s=900.0, output_tokens=32)
    # Only the workload is compared: no tokenizer, no prompts.
    monkeypatch.setattr(loadtest_cli, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(loadtest_cli, "PromptBuilder", lambda *a, **k: None)
    monkeypatch.setattr(loadtest_cli, "build_prompts", lambda builder, workload: [])
    parser = argparse.ArgumentParser()
    loadtest_cli._add_workload_args(parser)
    cli_args = parser.parse_args(["--tokenizer", "unused", *prefix_routing._trace_args(trace, bench_args)])
    _, cli_workload, _, _, _ = loadtest_cli._prepare(cli_args)

    sim_workload = prefix_routing_sim.build_requests(trace, bench_args)

    assert sim_workload == cli_workload
    assert len(sim_workload) == 40
    assert all(r.input_tokens <= 960 and r.output_tokens <= 32 for r in sim_workload)
    assert any(r.hash_ids for r in sim_workload) == (trace == "mooncake")


def test_worker_kv_holds_256k_tiny_model_tokens():
    # 4 layers x K and V x 2 KV heads x 64 dims x 4 bytes = 4 KiB a token; 1 GiB / 4 KiB
    assert prefix_routing_sim.kv_capacity_tokens() == 262_144
