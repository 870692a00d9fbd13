"""Fitting the cost model's fitted form (``planner.core.costmodel.prefill_terms`` / ``decode_terms``) to
measurements across GPUs and models.

Each latency is a sum of terms, each a physical quantity at the GPU's peak
rate times a fitted coefficient (so the coefficients carry over to GPUs and
models that were never measured):

prefill pass of ``s`` tokens through ``L`` layers on ``tp`` GPUs =
  ``k0`` (per pass) + ``k1 * L`` (per layer: kernel launches)
  + ``k2 * matmul FLOPs / (tp * peak)`` (1 / MFU)
  + ``k3 * attention FLOPs (s^2) / (tp * peak)`` (1 / attention efficiency)
  + ``k4 * weight bytes / (tp * bandwidth)``
  + ``k5 * all-reduce bytes / link bandwidth`` + ``k6 * all-reduce steps * link latency``

decode step of ``b`` requests of context ``c`` =
  ``d0`` + ``d1 * L`` + ``d2 * weight bytes / (tp * bandwidth)`` (1 / MBU)
  + ``d3 * KV bytes read / (tp * bandwidth)`` + ``d4 * b * L`` (per sequence and layer: attention
  metadata, sampling) + ``d5 * matmul FLOPs / (tp * peak)`` + ``d6 * all-reduce bytes / link``
  + ``d7 * all-reduce steps * link latency``.

The planner and the simulator use the coefficients fitted on every source
(``configs/cost_coefficients.json``, written by ``benchmarks.costmodel_fit
--write-coefficients``).

``fit`` solves for non-negative coefficients minimising the squared
*relative* error (every row divided by its measurement), so a 2 ms step and a
2 s prefill weigh alike. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from planner.core import costmodel as cm
from planner.spec.catalog import GpuSpec
from planner.spec.cost_coefficients import CostCoefficients
from planner.spec.model import ModelSpec


@dataclass(frozen=True, slots=True)
class Shape:
    """What a latency depends on: the GPU, the model, TP, and the layers timed (None: whole model)."""

    gpu: GpuSpec
    model: ModelSpec
    tp: int
    layers: int | None = None

    @property
    def num_layers(self) -> int:
        return self.model.num_layers if self.layers is None else self.layers

    @property
    def whole(self) -> bool:
        return self.layers is None


def _links(shape: Shape) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) among the TP ranks of the GPU's own node type."""
    return shape.gpu.intra_node_bytes_per_s, shape.gpu.intra_node_latency_s


def prefill_features(shape: Shape, tokens: float) -> np.ndarray:
    terms = cm.prefill_terms(shape.model, tokens, tokens**2, shape.gpu, shape.tp, shape.num_layers, shape.whole,
                             shape.whole, *_links(shape))
    return np.array([1.0, *terms], dtype=float)


def decode_features(shape: Shape, batch: float, context_tokens: float) -> np.ndarray:
    terms = cm.decode_terms(shape.model, batch, context_tokens, shape.gpu, shape.tp, shape.num_layers, shape.whole,
                            *_links(shape))
    return np.array([1.0, *terms], dtype=float)


@dataclass(frozen=True, slots=True)
class FittedModel:
    prefill: tuple[float, ...]  # coefficients, in PREFILL_TERMS order
    decode: tuple[float, ...]  # in DECODE_TERMS order

    def prefill_s(self, shape: Shape, tokens: float) -> float:
        return float(prefill_features(shape, tokens) @ np.asarray(self.prefill))

    def decode_s(self, shape: Shape, batch: float, context_tokens: float) -> float:
        return float(decode_features(shape, batch, context_tokens) @ np.asarray(self.decode))

    def to_json(self) -> dict:
        return self.coefficients().to_json()

    def coefficients(self) -> CostCoefficients:
        """The coefficients as the catalog's fitted cost form reads them."""
        return CostCoefficients(self.prefill, self.decode)


def nonnegative_least_squares(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: refit without the most negative term until none is negative
    (columns scaled to unit norm first; an all-zero column gets 0)."""
    norms = np.linalg.norm(a, axis=0)
    active = [j for j in range(a.shape[1]) if norms[j] > 0]
    coef = np.zeros(a.shape[1])
    while active:
        scaled = a[:, active] / norms[active]
        sol, *_ = np.linalg.lstsq(scaled, y, rcond=None)
        sol = sol / norms[active]
        if sol.min() >= 0:
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def fit_relative(rows: Sequence[np.ndarray], measured_s: Sequence[float]) -> np.ndarray:
    """Non-negative coefficients minimising the squared relative error of ``rows @ coef`` against ``measured_s``."""
    a = np.vstack(rows)
    y = np.asarray(measured_s, dtype=float)
    return nonnegative_least_squares(a / y[:, None], np.ones_like(y))


def fit(prefill: Sequence[tuple[Shape, float, float]], decode: Sequence[tuple[Shape, float, float, float]]) -> FittedModel:
    """Fit both phases: prefill samples are (shape, tokens, seconds), decode (shape, batch, context, seconds)."""
    p = fit_relative([prefill_features(s, t) for s, t, _ in prefill], [y for *_, y in prefill])
    d = fit_relative([decode_features(s, b, c) for s, b, c, _ in decode], [y for *_, y in decode])
    return FittedModel(tuple(float(x) for x in p), tuple(float(x) for x in d))


def error_factors(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """(geometric-mean error factor, worst factor): ``exp(mean |ln(p/m)|)`` and ``max(p/m, m/p)``."""
    logs = np.abs(np.log(np.asarray(predicted, dtype=float) / np.asarray(measured, dtype=float)))
    return float(np.exp(logs.mean())), float(np.exp(logs.max()))
