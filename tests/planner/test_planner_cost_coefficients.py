"""The planner's model of datacenter GPUs is the form fitted to published measurements, with the coefficients
in configs/cost_coefficients.json: the file matches a refit, the planner's pass functions give what the fit
predicts, and a roofline field on a fitted type is refused rather than ignored."""

from __future__ import annotations

import json

import pytest

from benchmarks.costmodel_fit import coefficients_document, engine_floor, fit_on, whole_model
from planner.core import costmodel as cm
from planner.core import profiles
from planner.spec.catalog import GB, default_catalog
from planner.spec.cost_coefficients import COST_COEFFICIENTS_PATH, load_cost_coefficients, parse_cost_coefficients
from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields
from planner.spec.measured import MEASURED_DIR, MeasuredPoint, load_all_measured

POINTS = [whole_model(p) for p in load_all_measured()]


def test_the_coefficients_file_is_the_fit_on_every_published_source():
    written = json.loads(COST_COEFFICIENTS_PATH.read_text())
    refit = coefficients_document(POINTS)
    for phase in ("prefill", "decode"):
        assert written[phase] == pytest.approx(refit[phase], rel=1e-6), (
            f"{phase}: configs/cost_coefficients.json is stale; run python -m benchmarks.costmodel_fit "
            "--write-coefficients")
    assert written["provenance"]["fitted_on"] == refit["provenance"]["fitted_on"]


def test_the_planners_passes_predict_what_the_fit_predicts_where_no_measurement_covers_them():
    """The kept-aside check points (and DistServe's own engine's) are not corrected by measurements
    (planner.core.profiles): there the planner is the fitted form itself."""
    fitted = fit_on(POINTS)
    catalog = default_catalog()
    check = [whole_model(p) for p in load_all_measured(MEASURED_DIR / "check")]
    uncovered = [p for p in POINTS + check if not profiles.covered(catalog.resolve(p.gpu, "gpu"), p.model, p.tp)]
    assert len(uncovered) >= len(check) > 100
    for p in uncovered:
        gpu = catalog.resolve(p.gpu, "gpu")
        assert gpu.cost_form == "fitted"
        stage = cm.Stage(gpu, p.tp, p.model.num_layers, True, True, gpu.intra_node_bandwidth_gb_per_s * GB,
                         gpu.intra_node_latency_us / 1e6)
        if p.phase == "prefill":
            planner_s = cm.prefill_pass(p.model, [stage], p.tokens, p.tokens**2)[0]
            fit_s = fitted.prefill_s(_shape(gpu, p), p.tokens)
        else:
            planner_s = cm.decode_step(p.model, [stage], p.batch, p.context_tokens)
            fit_s = fitted.decode_s(_shape(gpu, p), p.batch, p.context_tokens)
        assert planner_s == pytest.approx(fit_s, rel=1e-6), p


def _shape(gpu, p):
    from planner.core.costfit import Shape

    return Shape(gpu, p.model, p.tp)


def test_a_roofline_field_on_a_fitted_type_is_refused_and_roofline_takes_it():
    with pytest.raises(PlanInputError) as err:
        default_catalog().with_overrides(Fields({"H100": {"mfu": 0.3}}, "catalog"))
    assert "catalog.H100.mfu" in str(err.value) and "cost_form" in str(err.value)
    roofline = default_catalog().with_overrides(Fields({"H100": {"cost_form": "roofline", "mfu": 0.3}}, "catalog"))
    h100 = roofline.resolve("H100", "t")
    assert h100.cost_form == "roofline" and h100.mfu == 0.3
    mine = default_catalog().with_overrides(Fields({"MINE": {
        "peak_bf16_tflops": 100, "memory_gib": 24, "memory_bandwidth_gb_per_s": 500, "price_per_hour": 1,
        "intra_node_bandwidth_gb_per_s": 16, "cost_form": "fitted"}}, "catalog"))
    assert mine.resolve("MINE", "t").fitted == load_cost_coefficients()


def test_a_calibrated_type_is_modelled_by_its_measured_roofline():
    calibrated = default_catalog().with_calibration("A6000", {"mfu": 0.4, "mbu": 0.6, "prefill_overhead_ms": 9.0,
                                                              "decode_overhead_ms": 4.0})
    gpu = calibrated.resolve("A6000", "t")
    assert gpu.cost_form == "roofline" and cm.gpu_pass_overhead_s(gpu, "decode") == pytest.approx(0.004)


def test_a_coefficients_file_with_a_missing_or_negative_term_is_refused_by_field():
    doc = json.loads(COST_COEFFICIENTS_PATH.read_text())
    doc["decode"]["kv_read"] = -1
    with pytest.raises(PlanInputError, match="decode.kv_read"):
        parse_cost_coefficients(doc)
    del doc["decode"]["kv_read"]
    with pytest.raises(PlanInputError, match="kv_read"):
        parse_cost_coefficients(doc)


def test_the_engine_floor_is_half_the_log_distance_of_two_engines_on_the_same_points():
    model = POINTS[0].model
    a = [MeasuredPoint("engine-a", "A100-80G", model, 1, None, "decode", batch=b, context_tokens=256, ms=ms)
         for b, ms in ((1, 10.0), (8, 20.0))]
    b = [MeasuredPoint("engine-b", "A100-80G", model, 1, None, "decode", batch=b, context_tokens=256, ms=ms)
         for b, ms in ((1, 40.0), (8, 20.0), (16, 5.0))]  # batch 16: measured by one engine only
    floor = engine_floor(a + b)
    assert set(floor) == {"decode"} and floor["decode"]["n"] == 2
    assert floor["decode"]["apart_worst"] == pytest.approx(4.0) and floor["decode"]["floor_worst"] == pytest.approx(2.0)
    assert floor["decode"]["apart_gm"] == pytest.approx(2.0) and floor["decode"]["floor_gm"] == pytest.approx(2 ** 0.5, rel=1e-3)
    # The published pair (DistServe's engine and vLLM on the same A100 points) is where the floor comes from.
    published = engine_floor(POINTS)
    assert published["decode"]["n"] == 84 and published["prefill"]["n"] == 30
    assert published["decode"]["apart_worst"] > 1.5 ** 2 * 0.9  # the two engines alone nearly use up the worst-case target
