"""The fitted cost model: a synthetic profile's coefficients are recovered; measured files load with provenance."""

import itertools
import json

import numpy as np
import pytest

from planner.core import costfit
from planner.spec.catalog import default_catalog
from planner.spec.measured import MEASURED_DIR, load_all_measured
from planner.spec.model import model_preset

PREFILL_TRUE = (0.004, 2e-5, 1.6, 6.0, 0.3, 1.4, 8e-6)
DECODE_TRUE = (0.003, 5e-5, 1.25, 1.5, 2e-6, 1.1, 2.0, 6e-6)


def _shapes():
    cat = default_catalog()
    for gpu, model, tp in itertools.product(("H100", "A100-80G", "L4", "T4"), ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B"),
                                            (1, 2, 4, 8)):
        yield costfit.Shape(cat.resolve(gpu, "g"), model_preset(model), tp)


def _synthetic(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = costfit.FittedModel(PREFILL_TRUE, DECODE_TRUE)
    jitter = lambda: float(np.exp(rng.normal(0, noise))) if noise else 1.0  # noqa: E731
    prefill = [(s, t, truth.prefill_s(s, t) * jitter()) for s in _shapes() for t in (128, 512, 2048, 8192)]
    decode = [(s, b, c, truth.decode_s(s, b, c) * jitter()) for s in _shapes() for b in (1, 8, 64) for c in (256, 4096)]
    return prefill, decode


def test_a_synthetic_profile_is_recovered_exactly():
    fitted = costfit.fit(*_synthetic(0.0))
    assert fitted.prefill == pytest.approx(PREFILL_TRUE, rel=1e-6)
    assert fitted.decode == pytest.approx(DECODE_TRUE, rel=1e-6)


def test_a_noisy_synthetic_profile_predicts_within_the_noise():
    prefill, decode = _synthetic(0.03, seed=1)
    fitted = costfit.fit(prefill, decode)
    truth = costfit.FittedModel(PREFILL_TRUE, DECODE_TRUE)
    pred = [fitted.prefill_s(s, t) for s, t, _ in prefill] + [fitted.decode_s(s, b, c) for s, b, c, _ in decode]
    true = [truth.prefill_s(s, t) for s, t, _ in prefill] + [truth.decode_s(s, b, c) for s, b, c, _ in decode]
    gm, worst = costfit.error_factors(pred, true)
    assert gm < 1.02 and worst < 1.1


def test_coefficients_stay_non_negative():
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    coef = costfit.nonnegative_least_squares(a, np.array([3.0, 2.0, 1.0]))  # unconstrained slope is -1
    assert (coef >= 0).all() and coef[1] == 0 and coef[0] == pytest.approx(2.0)


def test_error_factors_are_symmetric():
    assert costfit.error_factors([2.0, 0.5], [1.0, 1.0]) == pytest.approx((2.0, 2.0))


def test_measured_files_have_provenance_and_positive_points():
    for path in sorted(MEASURED_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        prov = doc["provenance"]
        assert doc["schema"] == "hexserve.measured" and prov["repo"] and prov["commit"] and prov["what"]
    points = load_all_measured()
    assert len({p.source for p in points}) >= 3 and all(p.ms > 0 for p in points)
    assert all(default_catalog().resolve(p.gpu, "gpu") for p in points)
    # Splitwise's profile is kept aside to check the model, never fitted to.
    assert not any("splitwise" in p.source for p in points)
