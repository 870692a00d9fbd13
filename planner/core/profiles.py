"""Published measurements where they cover a point: the fitted form corrected to them.

Where `configs/measured/` holds measurements of vLLM (the engine hexserve
runs) for a (GPU type, model, TP) — the DistServe authors' vLLM profile of
OPT-13B and OPT-66B on A100-80G, Helix's per-layer Llama-2-70B on A100-40G,
L4, T4 and V100 — the cost model multiplies a stage's fitted time by
measured / fitted (``costmodel.measured_correction`` computes the ratios;
this module keeps the points and interpolates). Between measured points the
ratio is interpolated (prefill over log prompt tokens; decode over log
batch, then log context);
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

from planner.spec.catalog import GpuSpec
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


def measured_points(gpu: GpuSpec, model: ModelSpec, tp: int) -> tuple[MeasuredPoint, ...]:
    return _measured()[(gpu.name, model.name, tp)]


def correction_from(prefill: dict[float, float], decode: dict[tuple[float, float], float]) -> Correction:
    """The interpolation of measured / fitted ratios: prefill by prompt tokens, decode by (batch, context)."""
    by_context: dict[float, dict[float, float]] = defaultdict(dict)
    for (batch, context), ratio in decode.items():
        by_context[float(np.log(context))][float(np.log(batch))] = _log(ratio)
    tokens = sorted(prefill)
    return Correction(tuple(float(np.log(t)) for t in tokens), tuple(_log(prefill[t]) for t in tokens),
                      tuple((c, tuple(sorted(rows)), tuple(rows[b] for b in sorted(rows)))
                            for c, rows in sorted(by_context.items())))


def _log(ratio: float) -> float:
    return float(np.log(max(ratio, MIN_RATIO)))
