"""Where published vLLM measurements cover a (GPU, model, TP), the planner's cost model meets them
(planner.core.profiles): exactly at every measured point, held at the edge outside the profiled range, and
only from vLLM's measurements."""

from __future__ import annotations

import pytest

from planner.core import costmodel as cm
from planner.core import profiles
from planner.spec.catalog import GB, default_catalog
from planner.spec.measured import load_all_measured
from planner.spec.model import model_preset

CATALOG = default_catalog()
POINTS = load_all_measured()


def _stage(gpu, tp, layers, whole):
    return cm.Stage(gpu, tp, layers, whole, whole, gpu.intra_node_bandwidth_gb_per_s * GB,
                    gpu.intra_node_latency_us / 1e6)


def _planner_s(p) -> float:
    gpu = CATALOG.resolve(p.gpu, "gpu")
    whole = p.layers is None
    stage = _stage(gpu, p.tp, p.model.num_layers if whole else p.layers, whole)
    if p.phase == "prefill":
        if whole:
            return cm.prefill_pass(p.model, [stage], p.tokens, p.tokens**2)[0]
        return cm.prefill_stage_time(p.model, p.tokens, p.tokens**2, gpu, p.tp, p.layers, False, False,
                                     stage.intra_bandwidth_bytes_per_s, stage.intra_latency_s)
    if whole:
        return cm.decode_step(p.model, [stage], p.batch, p.context_tokens)
    return cm.decode_stage_time(p.model, p.context_tokens, gpu, p.tp, p.layers, p.batch, False, False,
                                stage.intra_bandwidth_bytes_per_s, stage.intra_latency_s)


def test_the_planner_meets_every_vllm_measurement():
    vllm = [p for p in POINTS if p.engine.startswith("vLLM")]
    assert {p.source for p in vllm} == {"distserve-a100-vllm", "helix-per-layer"}
    for p in vllm:
        assert _planner_s(p) == pytest.approx(p.ms / 1e3, rel=1e-6), p


def test_other_engines_measurements_are_not_used():
    pairs = {}
    for p in POINTS:
        if p.source.startswith("distserve") and p.phase == "prefill":
            pairs.setdefault((p.model.name, p.tp, p.tokens), {})[p.source] = p
    differ = [ps for ps in pairs.values() if abs(ps["distserve-a100-distserve"].ms - ps["distserve-a100-vllm"].ms)
              > 0.1 * ps["distserve-a100-vllm"].ms]
    assert differ  # the two engines disagree on these points; the planner follows vLLM
    for ps in differ:
        assert _planner_s(ps["distserve-a100-vllm"]) == pytest.approx(ps["distserve-a100-vllm"].ms / 1e3, rel=1e-6)


def test_between_and_beyond_the_profile():
    l4, model = CATALOG.resolve("L4", "gpu"), model_preset("Llama-2-70B")
    corr = cm.measured_correction(l4, model, 1)

    def per_layer(tokens):
        return cm.prefill_stage_time(model, tokens, tokens**2, l4, 1, 1, False, False, 12e9, 1e-5)

    measured = {p.tokens: p.ms / 1e3 for p in POINTS if p.gpu == "L4" and p.phase == "prefill"}
    assert min(measured[1000], measured[1250]) <= per_layer(1125) <= max(measured[1000], measured[1250])
    # Beyond 4000 tokens the ratio at 4000 holds: the fitted form's growth, scaled to meet the edge.
    fitted = cm.fitted_time(l4.fitted.prefill, cm.prefill_terms(model, 8000, 8000**2, l4, 1, 1, False, False,
                                                                12e9, 1e-5))
    assert per_layer(8000) == pytest.approx(fitted * corr.prefill(4000))
    assert per_layer(8000) > 2 * measured[4000]


def test_points_without_measurements_and_roofline_types_are_not_corrected():
    model = model_preset("Llama-2-70B")
    h100 = CATALOG.resolve("H100", "gpu")
    assert not profiles.covered(h100, model, 4)  # Splitwise's H100 profile is the kept-aside check
    assert not profiles.covered(CATALOG.resolve("L4", "gpu"), model, 2)
    calibrated = CATALOG.with_calibration("L4", {"mfu": 0.4, "mbu": 0.6}).resolve("L4", "gpu")
    assert not profiles.covered(calibrated, model, 1)
