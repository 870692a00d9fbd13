"""`python -m planner estimate`: one prediction of the cost model the planner and simulator share."""

import json

import pytest

from planner.__main__ import main
from planner.core import costmodel as cm
from planner.spec.catalog import GB, default_catalog
from planner.spec.model import model_preset

BASE = ["estimate", "--gpu", "H100", "--tp", "4", "--model", "Llama-2-70B"]


def _stage():
    h100 = default_catalog().resolve("H100", "t")
    return cm.Stage(h100, 4, 80, True, True, h100.intra_node_bandwidth_gb_per_s * GB, h100.intra_node_latency_us / 1e6)


def test_prefill_and_decode_predictions_are_the_cost_model(capsys):
    assert main(BASE + ["--prefill-tokens", "2048", "--decode-batch", "32", "--context", "640", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = model_preset("Llama-2-70B")
    prefill_s = cm.prefill_pass(model, [_stage()], 2048, 2048**2)[0]
    step_s = cm.decode_step(model, [_stage()], 32, 640)
    assert out["prefill"]["latency_ms"] == pytest.approx(prefill_s * 1e3, abs=1e-3)
    assert out["decode"]["step_ms"] == pytest.approx(step_s * 1e3, abs=1e-3)
    assert out["weights_fit"] and out["tp"] == 4 and out["gpu"] == "H100"
    assert main(BASE + ["--prefill-tokens", "2048"]) == 0
    assert "prefill of 2048 tokens:" in capsys.readouterr().out


@pytest.mark.parametrize("extra, flag", [
    (["--prefill-tokens", "0"], "--prefill-tokens"),
    (["--prefill-tokens", "many"], "--prefill-tokens"),
    (["--decode-batch", "8"], "--context"),
    (["--context", "640"], "--decode-batch"),
    ([], "--prefill-tokens"),
])
def test_bad_input_is_one_line_naming_the_flag(capsys, extra, flag):
    assert main(BASE + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_bad_gpu_tp_and_model_name_their_flag(capsys):
    for argv, flag in ((["estimate", "--gpu", "B300", "--model", "Llama-2-70B", "--prefill-tokens", "9"], "--gpu"),
                       (["estimate", "--gpu", "H100", "--model", "Llama-9", "--prefill-tokens", "9"], "--model"),
                       (BASE[:3] + ["--tp", "3", "--model", "Llama-2-70B", "--prefill-tokens", "9"], "--tp")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag}:")


def test_fitted_form_is_offered_beside_the_planner_model(capsys):
    assert main(BASE + ["--prefill-tokens", "2048", "--decode-batch", "32", "--context", "640", "--json", "--fitted"]) == 0
    out = json.loads(capsys.readouterr().out)
    fitted = out["fitted"]
    assert fitted["prefill_latency_ms"] > 0 and fitted["decode_step_ms"] > 0
    assert len(fitted["sources"]) >= 3 and not any("splitwise" in s for s in fitted["sources"])
    assert out["prefill"]["latency_ms"] > 0  # the planner's own prediction stays the first answer
