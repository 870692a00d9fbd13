"""Fit the cost model's coefficients to a measured profile.

A profile (written by ``python -m planner profile``) holds prefill latencies
for several prompt lengths and decode step times for several batch sizes,
measured on one GPU type with one model. The cost model predicts

    prefill latency = overhead_p + FLOPs(prompt) / (tp * peak * mfu)
    decode step     = overhead_d + bytes read(batch) / (tp * bandwidth * mbu)

so a least-squares line through (FLOPs, latency) gives ``mfu`` and the
prefill overhead, and one through (bytes, step) gives ``mbu`` and the decode
overhead. Fitted efficiencies are clamped to (0, 1]; the fit's R^2 is kept.

The fit sits with the inputs rather than in ``planner.core``: a cluster file's
``calibration`` list is applied while the file is read (``apply_profile_files``,
called by ``planner.spec.cluster``), and the inputs layer never imports the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner.spec.catalog import GB, Catalog, GpuSpec
from planner.spec.fields import check_number
from planner.spec.model import ModelSpec
from planner.spec.profile import Profile, load_profile


@dataclass(frozen=True, slots=True)
class Fit:
    mfu: float
    mbu: float
    prefill_overhead_ms: float
    decode_overhead_ms: float
    prefill_r2: float
    decode_r2: float

    def coefficients(self) -> dict[str, float]:
        return {
            "mfu": self.mfu,
            "mbu": self.mbu,
            "prefill_overhead_ms": self.prefill_overhead_ms,
            "decode_overhead_ms": self.decode_overhead_ms,
        }


def prefill_flops(model: ModelSpec, prompt_tokens: float) -> float:
    """FLOPs of one prompt through the whole model (the cost model's prefill numerator)."""
    return model.prefill_flops(model.num_layers, prompt_tokens, prompt_tokens**2, last=True)


def decode_bytes(model: ModelSpec, batch: int, context_tokens: float) -> float:
    """Bytes one decode step reads: weights, LM head, and the batch's KV cache."""
    return model.decode_bytes(model.num_layers, batch, context_tokens, last=True)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares y = a + b x with a >= 0, b > 0; returns (a, b, r2)."""
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    if a < 0 or b <= 0:
        a = 0.0
        b = float(np.dot(x, y) / np.dot(x, x))
    pred = a + b * x
    ss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - float(np.sum((y - pred) ** 2)) / ss if ss > 0 else 1.0
    return float(a), float(b), r2


def fit_profile(profile: Profile, spec: GpuSpec) -> Fit:
    model, tp = profile.model, profile.tp
    x = np.array([prefill_flops(model, s.prompt_tokens) for s in profile.prefill])
    y = np.array([s.latency_ms / 1e3 for s in profile.prefill])
    a_p, b_p, r2_p = _line(x, y)
    mfu = 1 / (b_p * tp * spec.peak_bf16_tflops * 1e12)
    x = np.array([decode_bytes(model, s.batch, s.context_tokens) for s in profile.decode])
    y = np.array([s.step_ms / 1e3 for s in profile.decode])
    a_d, b_d, r2_d = _line(x, y)
    mbu = 1 / (b_d * tp * spec.memory_bandwidth_gb_per_s * GB)
    return Fit(
        mfu=float(min(mfu, 1.0)),
        mbu=float(min(mbu, 1.0)),
        prefill_overhead_ms=a_p * 1e3,
        decode_overhead_ms=a_d * 1e3,
        prefill_r2=r2_p,
        decode_r2=r2_d,
    )


def apply_profile_files(catalog: Catalog, paths: list[tuple[str, Path]]) -> Catalog:
    """The catalog with each profile's fitted coefficients applied to its GPU type."""
    for field, path in paths:
        profile = load_profile(path, field)
        spec = catalog.resolve(profile.gpu_type, f"{field}.gpu_type")
        fit = fit_profile(profile, spec)
        for name, value in fit.coefficients().items():
            check_number(value, f"{field} (fitted {name})", minimum=0)
        catalog = catalog.with_calibration(spec.name, fit.coefficients())
    return catalog
