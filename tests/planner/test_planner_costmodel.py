"""The cost model's terms, each against a hand computation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner.core import costmodel as cm
from planner.spec.catalog import default_catalog
from planner.spec.model import model_preset
from planner.spec.workload import Workload

H100_FITTED = default_catalog().resolve("H100", "t")
# The roofline form, as a calibrated type is modelled.
H100 = replace(H100_FITTED, fitted=None, mfu=0.55, mbu=0.75)
L70 = model_preset("Llama-2-70B")
WL = Workload(input_mean=1000, output_mean=200, input_sq_mean=1000**2, ttft_slo_s=2.0, tpot_slo_s=0.1)


def test_allreduce_is_ring_shaped_and_free_for_one_rank():
    assert cm.allreduce_time(1e9, 1, 100e9, 1e-5) == 0.0
    # 2 (t-1)/t * bytes / bw + 2 (t-1) * latency
    assert cm.allreduce_time(1e9, 4, 100e9, 1e-5) == pytest.approx(2 * 3 / 4 * 1e9 / 100e9 + 6 * 1e-5)


def test_prefill_is_compute_bound_and_scales_with_tp_minus_communication():
    one = cm.prefill_stage_time(L70, 1000, 1000**2, H100, 1, 80, True, True, 450e9, 5e-6)
    flops = 80 * (2 * L70.params_per_layer * 1000 + 2 * 64 * 128 * 1000**2) + 2 * 8192 * 32000
    assert one == pytest.approx(flops / H100.flops_per_s)
    four = cm.prefill_stage_time(L70, 1000, 1000**2, H100, 4, 80, True, True, 450e9, 5e-6)
    comm = 80 * 2 * cm.allreduce_time(1000 * 8192 * 2, 4, 450e9, 5e-6)
    assert four == pytest.approx(one / 4 + comm)


def test_prefill_attention_term_grows_with_the_prompt_square():
    assert cm.prefill_stage_time(L70, 1000, 4 * 1000**2, H100, 1, 80, False, False, 1, 0) > cm.prefill_stage_time(
        L70, 1000, 1000**2, H100, 1, 80, False, False, 1, 0)


def test_decode_step_reads_weights_and_kv():
    t = cm.decode_stage_time(L70, WL.decode_context_mean, H100, 2, 80, 16, True, True, 450e9, 5e-6)
    read = 80 * L70.layer_weight_bytes + L70.lm_head_bytes + 80 * 16 * 1100 * L70.kv_bytes_per_token_per_layer
    comm = 80 * 2 * cm.allreduce_time(16 * 8192 * 2, 2, 450e9, 5e-6)
    assert t == pytest.approx(read / (2 * H100.mem_bytes_per_s) + comm)
    assert cm.decode_stage_time(L70, WL.decode_context_mean, H100, 2, 80, 64, True, True, 450e9, 5e-6) > t


def test_kv_sizes_and_shards():
    assert cm.kv_bytes_per_request(L70, WL) == L70.kv_bytes_per_token * 1000
    assert cm.kv_shard_fraction(L70, 40, 2) == pytest.approx(0.25)
    assert cm.kv_shard_fraction(L70, 80, 16) == pytest.approx(1 / 8)  # 8 KV heads: TP 16 replicates


def test_the_fitted_form_is_its_coefficients_times_physical_terms():
    c = dict(zip(("per_pass_s", "per_layer_s", "matmul", "attention", "weights", "ar_bytes", "ar_latency"),
                 H100_FITTED.fitted.prefill))
    peak, bw = 989e12 * 4, 3350e9 * 4
    t = cm.prefill_stage_time(L70, 1000, 1000**2, H100_FITTED, 4, 80, True, True, 450e9, 5e-6)
    matmul = 80 * 2 * L70.params_per_layer * 1000 + 2 * 8192 * 32000
    attention = 80 * 2 * 64 * 128 * 1000**2
    weights = cm.stage_weight_bytes(L70, 80, True, True)
    ar_bytes = 80 * 2 * (2 * 3 / 4 * 1000 * 8192 * 2) / 450e9
    expected = (c["per_layer_s"] * 80 + c["matmul"] * matmul / peak + c["attention"] * attention / peak
                + c["weights"] * weights / bw + c["ar_bytes"] * ar_bytes + c["ar_latency"] * 80 * 2 * 6 * 5e-6)
    assert t == pytest.approx(expected)
    stage = cm.Stage(H100_FITTED, 4, 80, True, True, 450e9, 5e-6)
    assert cm.prefill_pass(L70, [stage], 1000, 1000**2)[0] == pytest.approx(expected + c["per_pass_s"])


def test_the_fitted_decode_step_grows_with_the_batch_and_splits_across_stages():
    one = cm.decode_stage_time(L70, 1100, H100_FITTED, 2, 80, 1, True, True, 450e9, 5e-6)
    sixty_four = cm.decode_stage_time(L70, 1100, H100_FITTED, 2, 80, 64, True, True, 450e9, 5e-6)
    assert sixty_four > one + 0.01  # the published steps rise 20-30 ms from batch 1 to 64; the roofline barely did
    halves = [cm.decode_stage_time(L70, 1100, H100_FITTED, 2, 40, 8, first, last, 450e9, 5e-6)
              for first, last in ((True, False), (False, True))]
    assert sum(halves) == pytest.approx(cm.decode_stage_time(L70, 1100, H100_FITTED, 2, 80, 8, True, True,
                                                             450e9, 5e-6))


def test_a_prefill_worker_on_cores_that_also_do_its_host_work_pays_the_overhead_in_service_time():
    """A GPU overlaps the per-pass host work with compute: service is the compute alone. Where the same
    cores do both (a CPU, a lab device) a prefill worker's pass (own_step) pays it in service too;
    a prefill riding on a colocated decode step does not (decode_step charges that step's overhead)."""
    cpu = default_catalog().resolve("CPU", "t")
    assert H100.host_work_overlaps and not cpu.host_work_overlaps
    small = model_preset("Llama-3-8B")
    for gpu in (H100, cpu):
        stage = cm.Stage.replica(gpu, 1, small.num_layers)
        latency, service = cm.prefill_pass(small, [stage], 500, 500**2)
        own_latency, own_service = cm.prefill_pass(small, [stage], 500, 500**2, own_step=True)
        overhead = gpu.prefill_overhead_ms / 1e3
        assert latency == own_latency == pytest.approx(service + overhead)  # one stage: compute + overhead
        assert own_service == pytest.approx(service + (0.0 if gpu.host_work_overlaps else overhead))
