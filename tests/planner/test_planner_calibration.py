"""The profile fit's per-request decode term: recovered where two contexts tell it apart, charged by the cost model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from planner.core import costmodel as cm
from planner.spec.calibration import decode_bytes, fit_profile, prefill_flops
from planner.spec.catalog import default_catalog
from planner.spec.errors import PlanInputError
from planner.spec.model import model_preset
from planner.spec.profile import parse_profile
from planner_factories import make_cluster

TINY = model_preset("hexserve-tiny-llama")
CPU = default_catalog().resolve("CPU", "t")
MFU, PREFILL_OVERHEAD_MS = 0.03, 40.0
BANDWIDTH_BYTES_PER_S, STEP_MS, PER_REQUEST_MS = 0.4e9, 20.0, 0.9


def step_ms(batch: int, context: float) -> float:
    """A CPU-like decode step: a fixed cost, a cost per request, and the bytes it reads."""
    return STEP_MS + batch * PER_REQUEST_MS + decode_bytes(TINY, batch, context) / BANDWIDTH_BYTES_PER_S * 1e3


def profile_document(contexts: tuple[float, ...]) -> dict:
    return {
        "schema": "hexserve.profile", "schema_version": 1, "gpu_type": "CPU", "tp": 1, "model": TINY.to_json(),
        "prefill": [{"prompt_tokens": n,
                     "latency_ms": PREFILL_OVERHEAD_MS + prefill_flops(TINY, n) / (CPU.peak_bf16_tflops * 1e12 * MFU) * 1e3}
                    for n in (16, 128, 512)],
        "decode": [{"batch": b, "context_tokens": c, "step_ms": step_ms(b, c)} for c in contexts for b in (1, 4, 16)],
    }


def test_two_contexts_tell_the_per_request_cost_from_the_kv_reads():
    fit = fit_profile(parse_profile(profile_document((48.0, 288.0))), CPU)
    assert fit.decode_seq_overhead_ms == pytest.approx(PER_REQUEST_MS, rel=1e-6)
    assert fit.decode_overhead_ms == pytest.approx(STEP_MS, rel=1e-6)
    assert fit.mbu == pytest.approx(BANDWIDTH_BYTES_PER_S / (CPU.memory_bandwidth_gb_per_s * 1e9), rel=1e-6)
    assert fit.decode_r2 == pytest.approx(1.0)
    assert fit.mfu == pytest.approx(MFU, rel=1e-6) and fit.prefill_overhead_ms == pytest.approx(PREFILL_OVERHEAD_MS)


def test_at_one_context_the_batch_cost_goes_to_the_kv_reads_and_extrapolates_badly():
    """What the lab's first profiles did: the per-request cost read as KV bytes, too slow at long contexts."""
    fit = fit_profile(parse_profile(profile_document((48.0,))), CPU)
    assert fit.decode_seq_overhead_ms == 0.0
    predicted_ms = fit.decode_overhead_ms + decode_bytes(TINY, 8, 700.0) / (CPU.memory_bandwidth_gb_per_s * 1e9
                                                                             * fit.mbu) * 1e3
    assert predicted_ms > 1.4 * step_ms(8, 700.0)


def test_the_calibrated_cost_model_predicts_a_step_it_was_not_fitted_on(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(profile_document((48.0, 288.0))))
    cluster = make_cluster(nodes=[{"gpu_type": "CPU", "num_gpus": 1}], model="hexserve-tiny-llama",
                           calibration=[str(path)])
    gpu = cluster.nodes[0].spec
    assert gpu.decode_seq_overhead_ms == pytest.approx(PER_REQUEST_MS, rel=1e-6)
    stage = cm.Stage.replica(gpu, 1, TINY.num_layers)
    # Batch 8 at a 700-token context: neither was profiled. The roofline takes the larger of bytes and
    # FLOPs, and on this profile the bytes are the larger.
    assert cm.decode_step(TINY, [stage], 8, 700.0) * 1e3 == pytest.approx(step_ms(8, 700.0), rel=1e-3)


def test_decode_step_charges_the_per_request_cost_once_per_request():
    base = cm.Stage.replica(CPU, 1, TINY.num_layers)
    charged = cm.Stage.replica(dataclasses.replace(CPU, decode_seq_overhead_ms=2.0), 1, TINY.num_layers)
    for batch in (1, 6):
        extra_s = cm.decode_step(TINY, [charged], batch, 300.0) - cm.decode_step(TINY, [base], batch, 300.0)
        assert extra_s == pytest.approx(batch * 2e-3)


def test_the_catalog_field_is_checked():
    with pytest.raises(PlanInputError, match=r"catalog\.CPU\.decode_seq_overhead_ms"):
        make_cluster(nodes=[{"gpu_type": "CPU", "num_gpus": 1}], catalog={"CPU": {"decode_seq_overhead_ms": -1}})
    with pytest.raises(PlanInputError, match="is a roofline coefficient"):
        make_cluster(nodes=[{"gpu_type": "H100", "num_gpus": 1}], catalog={"H100": {"decode_seq_overhead_ms": 1}})


def test_a_step_that_does_not_grow_with_the_context_keeps_the_peak_bandwidth_and_charges_per_request():
    """The lab's FAST device: the step grows with the batch, not the context (KV reads do not bind on a CPU)."""
    document = profile_document((48.0, 272.0))
    for sample in document["decode"]:
        sample["step_ms"] = 16.0 + 0.5 * sample["batch"]
    fit = fit_profile(parse_profile(document), CPU)
    assert fit.mbu == 1.0  # never faster than the peak: the bytes are charged at it, the rest fitted around
    assert fit.decode_seq_overhead_ms == pytest.approx(0.5, rel=0.1)  # less the KV bytes read at the peak
    assert fit.decode_r2 > 0.99
