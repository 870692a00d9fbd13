"""Published measurements where they cover a point: the fitted form corrected to them.

Where `configs/measured/` holds measurements of vLLM (the engine hexserve
runs) for a (GPU type, model, TP) — the DistServe authors' vLLM profile of
OPT-13B and OPT-66B on A100-80G, Helix's per-layer Llama-2-70B on A100-40G,
L4, T4 and V100 — the cost model multiplies a stage's fitted time by
measured / fitted. Between measured points the ratio is interpolated
(prefill over log prompt tokens; decode over log batch, then log context);
outside them it is held at the nearest edge (the inputs clamped to the
profiled range, as Dynamo's interpolators clamp theirs), so the form's shape
carries the time beyond the profile, scaled to meet it at its edge. At every
measured point the corrected time is the measurement.

Not used: other engines' points (DistServe's own engine) and the kept-aside
check set (`configs/measured/check/`). Roofline types (the CPU, calibrated
types) keep their own measured coefficients.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.spec.catalog import GB, GpuSpec
from planner.spec.measured import MeasuredPoint, load_all_measured
from planner.spec.model import ModelSpec

ENGINE = "vLLM"  # a source's provenance engine must start with this
MIN_RATIO = 0.05  # a measurement below the fitted constant alone: never scale a stage by less


@dataclass(frozen=True, slots=True)
class Correction:
    """measured / fitted over a (GPU, model, TP)'s measured points, in log space."""

    prefill_log_tokens: tuple[float, ...]
    prefill_log_ratio: tuple[float, ...]
    # Per measured context (ascending): (log context, log batches, log ratios).
    decode: tuple[tuple[float, tuple[float, ...], tuple[float, ...]], ...]

    def prefill(self, tokens: float) -> float:
        if not self.prefill_log_tokens:
            return 1.0
        return float(np.exp(np.interp(np.log(max(tokens, 1.0)), self.prefill_log_tokens, self.prefill_log_ratio)))

    def decode_ratio(self, batch: float, context_tokens: float) -> float:
        if not self.decode:
            return 1.0
        per_context = [np.interp(np.log(max(batch, 1.0)), batches, ratios) for _, batches, ratios in self.decode]
        contexts = [c for c, _, _ in self.decode]
        return float(np.exp(np.interp(np.log(max(context_tokens, 1.0)), contexts, per_context)))


@lru_cache(maxsize=1)
def _measured() -> dict[tuple[str, str, int], tuple[MeasuredPoint, ...]]:
    found: dict[tuple[str, str, int], list[MeasuredPoint]] = defaultdict(list)
    for p in load_all_measured():
        if p.engine.startswith(ENGINE):
            found[(p.gpu, p.model.name, p.tp)].append(p)
    return {key: tuple(points) for key, points in found.items()}


def covered(gpu: GpuSpec, model: ModelSpec, tp: int) -> bool:
    """Whether measurements correct this (fitted) GPU type, model and TP: a cheap check before `correction`."""
    return gpu.fitted is not None and (gpu.name, model.name, tp) in _measured()


@lru_cache(maxsize=256)
def correction(gpu: GpuSpec, model: ModelSpec, tp: int) -> Correction:
    """The ratios of the measured points of `covered` (gpu, model, tp) to the fitted form's stage times."""
    from planner.core import costmodel as cm  # the cost model calls this module: imported when first needed

    link = (gpu.intra_node_bandwidth_gb_per_s * GB, gpu.intra_node_latency_us / 1e6)
    prefill: dict[float, float] = {}
    decode: dict[float, dict[float, float]] = defaultdict(dict)
    for p in _measured()[(gpu.name, model.name, tp)]:
        whole = p.layers is None
        layers = model.num_layers if whole else p.layers
        if p.phase == "prefill":
            stage = cm.fitted_time(gpu.fitted.prefill, cm.prefill_terms(model, p.tokens, p.tokens**2, gpu, tp,
                                                                         layers, whole, whole, *link))
            fixed = gpu.fitted.per_pass_s if whole else 0.0  # the pass's constant is not a stage's
            prefill[float(np.log(p.tokens))] = _log_ratio(p.ms / 1e3 - fixed, stage)
        else:
            stage = cm.fitted_time(gpu.fitted.decode, cm.decode_terms(model, p.batch, p.context_tokens, gpu, tp,
                                                                       layers, whole, *link))
            fixed = gpu.fitted.per_step_s if whole else 0.0
            decode[float(np.log(p.context_tokens))][float(np.log(p.batch))] = _log_ratio(p.ms / 1e3 - fixed, stage)
    tokens = tuple(sorted(prefill))
    return Correction(tokens, tuple(prefill[t] for t in tokens),
                      tuple((c, tuple(sorted(by_batch)), tuple(by_batch[b] for b in sorted(by_batch)))
                            for c, by_batch in sorted(decode.items())))


def _log_ratio(measured_s: float, fitted_s: float) -> float:
    return float(np.log(max(measured_s / fitted_s, MIN_RATIO)))
