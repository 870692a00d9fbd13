"""Parsing and validation of cluster files, the GPU catalog, model presets and workloads."""

from __future__ import annotations

import json
import re

import pytest

from planner.spec.catalog import default_catalog
from planner.spec.cluster import load_cluster, parse_cluster
from planner.spec.errors import PlanInputError
from planner.spec.model import model_preset, preset_names
from planner_factories import CONFIGS, REPO, cluster_dict, make_cluster

REQUIRED_GPUS = ["H100", "H200", "A100-80G", "A100-40G", "L40S", "L40", "A6000", "A10G", "L4", "RTX4090", "V100",
                 "T4", "CPU"]
REQUIRED_MODELS = ["Llama-2-70B", "Llama-3-8B", "Llama-3-70B", "OPT-30B", "Qwen2.5-32B"]


def test_catalog_has_every_required_type_with_sane_numbers():
    cat = default_catalog()
    for name in REQUIRED_GPUS:
        g = cat.resolve(name, "t")
        assert g.peak_bf16_tflops > 0 and g.memory_gib > 0 and g.memory_bandwidth_gb_per_s > 0
        assert 0 < g.mfu <= 1 and 0 < g.mbu <= 1
    assert cat.resolve("H200", "t").memory_gib > cat.resolve("H100", "t").memory_gib
    assert cat.resolve("A100", "t").name == "A100-80G"  # alias


def test_every_rentable_catalog_price_cites_a_public_source_and_date():
    cat = default_catalog()
    for name in REQUIRED_GPUS:
        if name == "CPU":  # a nominal price for planning the embedded default, not a rental
            continue
        source = cat.resolve(name, "t").price_source
        assert "https://" in source and re.search(r"seen \d{4}-\d{2}", source), (name, source)


def test_presets_match_published_shapes():
    assert set(REQUIRED_MODELS) <= set(preset_names())
    m = model_preset("Llama-2-70B")
    # ~69B parameters: 80 layers of ~856M plus embeddings.
    params = m.num_layers * m.params_per_layer + 2 * m.vocab_size * m.hidden_size
    assert 68e9 < params < 70e9
    assert m.kv_bytes_per_token == 80 * 2 * 8 * 128 * 2  # GQA: 8 KV heads of 128 dims, bf16
    assert 7.5e9 < model_preset("Llama-3-8B").weight_bytes / 2 < 8.2e9
    assert 29e9 < model_preset("OPT-30B").weight_bytes / 2 < 31e9
    assert model_preset("llama2-70b") == m  # alias


def test_tiny_preset_matches_the_engine_tiny_model():
    from engine.tiny_model import TinyModelSpec

    spec, preset = TinyModelSpec(), model_preset("hexserve-tiny-llama")
    assert (preset.num_layers, preset.hidden_size, preset.num_attention_heads, preset.num_key_value_heads,
            preset.intermediate_size) == (spec.num_layers, spec.hidden_size, spec.num_attention_heads,
                                          spec.num_key_value_heads, spec.intermediate_size)


def test_hf_config_is_read_like_the_preset():
    c = make_cluster(model={"hf_config": "configs/hf/llama-2-13b/config.json"})
    preset = model_preset("Llama-2-13B")
    assert c.model.weight_bytes == preset.weight_bytes
    assert c.model.dtype == "float16"
    assert c.model.kv_bytes_per_token == preset.kv_bytes_per_token


def test_model_overrides_apply_on_top_of_a_preset():
    c = make_cluster(model={"preset": "Llama-3-8B", "dtype": "fp8"})
    assert c.model.dtype_bytes == 1
    assert c.model.weight_bytes == model_preset("Llama-3-8B").weight_bytes // 2


def test_catalog_override_in_the_cluster_file():
    c = make_cluster(catalog={"H100": {"price_per_hour": 9.5}, "MyGPU": {
        "peak_bf16_tflops": 100, "memory_gib": 64, "memory_bandwidth_gb_per_s": 1000, "price_per_hour": 1,
        "intra_node_bandwidth_gb_per_s": 50}},
        nodes=[{"gpu_type": "H100", "num_gpus": 2}, {"gpu_type": "MyGPU", "num_gpus": 4}])
    assert c.nodes[0].spec.price_per_hour == 9.5
    assert c.nodes[0].spec.price_source == "cluster file"  # the catalog's citation no longer applies
    assert c.nodes[1].spec.memory_gib == 64
    assert c.price_per_hour == pytest.approx(2 * 9.5 + 4 * 1)


def test_node_count_expands_and_links_are_resolved():
    c = make_cluster(
        nodes=[{"name": "us", "gpu_type": "H100", "num_gpus": 8, "count": 2, "region": "us"},
               {"name": "eu", "gpu_type": "A100-80G", "num_gpus": 8, "region": "eu"}],
        network={"inter_node": {"bandwidth_gb_per_s": 50, "latency_us": 10},
                 "links": [{"between": ["us", "eu"], "bandwidth_gb_per_s": 0.5, "latency_us": 40000},
                           {"between": ["us-0", "us-1"], "bandwidth_gb_per_s": 25}]})
    assert [n.name for n in c.nodes] == ["us-0", "us-1", "eu"]
    assert c.bandwidth[0, 0] == 450e9  # NVLink from the catalog
    assert c.bandwidth[0, 1] == 25e9  # node-pair link beats the default
    assert c.bandwidth[0, 2] == 0.5e9 and c.latency[0, 2] == pytest.approx(0.04)
    assert c.bandwidth[2, 1] == c.bandwidth[1, 2]


@pytest.mark.parametrize(
    "mutate, field, allowed",
    [
        (lambda d: d["fleet"]["nodes"][0].update(gpu_type="A100X"), "fleet.nodes[0].gpu_type", "known: A100-40G"),
        (lambda d: d["fleet"]["nodes"][0].update(num_gpus=0), "fleet.nodes[0].num_gpus", ">= 1"),
        (lambda d: d["fleet"]["nodes"][0].update(num_gpus="8"), "fleet.nodes[0].num_gpus", "integer"),
        (lambda d: d["fleet"].update(nodes=[]), "fleet.nodes", "at least 1"),
        (lambda d: d["fleet"]["nodes"][0].update(gpus=8), "fleet.nodes[0].gpus", "allowed here"),
        (lambda d: d["workload"]["slo"].update(ttft_ms=-1), "workload.slo.ttft_ms", "> 0"),
        (lambda d: d["workload"]["slo"].pop("tpot_ms"), "workload.slo.tpot_ms", "required"),
        (lambda d: d["workload"].pop("output_tokens_mean"), "workload.output_tokens_mean", "required"),
        (lambda d: d.update(workload={"trace": "nope.csv", "slo": {"ttft_ms": 1, "tpot_ms": 1}}), "workload.trace",
         "does not exist"),
        (lambda d: d["workload"].update(trace="x.csv"), "workload.input_tokens_mean", "either a trace or"),
        (lambda d: d.update(model={"preset": "GPT-5"}), "model.preset", "known: "),
        (lambda d: d.update(model={"hf_config": "missing/config.json"}), "model.hf_config", "cannot read"),
        (lambda d: d.update(model={"num_layers": 2, "hidden_size": 100, "num_attention_heads": 3,
                                   "intermediate_size": 10, "vocab_size": 10}), "model.hidden_size", "multiple"),
        (lambda d: d["network"].pop("inter_node"), "network.inter_node", "more than one node"),
        (lambda d: d["network"].update(links=[{"between": ["x", "y"], "bandwidth_gb_per_s": 1}]),
         "network.links[0].between", "two nodes"),
        (lambda d: d.update(options={"memory_utilization": 1.5}), "options.memory_utilization", "<= 1"),
        (lambda d: d.update(catalog={"H100": {"cost_form": "roofline", "mfu": 0}}), "catalog.H100.mfu", "> 0"),
        (lambda d: d.update(catalog={"H100": {"mfu": 0.4}}), "catalog.H100.mfu",
         'is a roofline coefficient, but this type uses the fitted cost model; also set cost_form to "roofline"'),
        (lambda d: d.update(catalog={"H100": {"price_source": {"offer": "x", "url": "u", "seen": "May 2026"}}}),
         "catalog.H100.price_source.seen", "YYYY-MM-DD"),
        (lambda d: d.update(catalog={"H100": {"price_source": {"offer": "x", "url": "u", "seen": "2026-05", "tier": 1}}}),
         "catalog.H100.price_source.tier", "allowed here"),
        (lambda d: d.update(catalog={"H100": {"host_work_overlaps": "no"}}), "catalog.H100.host_work_overlaps",
         "true or false"),
        (lambda d: d.update(schema="something.else"), "schema", "hexserve.cluster"),
        (lambda d: d.update(colour="blue"), "colour", "allowed here"),
    ],
)
def test_bad_input_names_the_field_and_what_is_allowed(mutate, field, allowed):
    data = cluster_dict()
    mutate(data)
    with pytest.raises(PlanInputError) as info:
        parse_cluster(data, REPO)
    assert info.value.field == field
    assert allowed in str(info.value)


def test_cross_region_fleet_without_a_link_is_rejected():
    data = cluster_dict(nodes=[{"gpu_type": "H100", "num_gpus": 8, "region": "a"},
                               {"gpu_type": "H100", "num_gpus": 8, "region": "b"}],
                        network={"inter_node": {"bandwidth_gb_per_s": 50}})
    with pytest.raises(PlanInputError, match="network.inter_region: is required"):
        parse_cluster(data, REPO)


def test_load_cluster_reports_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(PlanInputError, match="cannot read"):
        load_cluster(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"fleet\": ")
    with pytest.raises(PlanInputError, match="not valid JSON: line 1"):
        load_cluster(bad)


def test_every_example_config_parses():
    examples = [p for p in sorted(CONFIGS.glob("*.json")) if json.loads(p.read_text()).get("schema") == "hexserve.cluster"]
    assert len(examples) >= 5
    for path in examples:
        cluster = load_cluster(path)
        assert cluster.num_gpus > 0 and cluster.workload.ttft_slo_s > 0
