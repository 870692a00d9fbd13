"""Fit the cost model's coefficients to a measured profile.

A profile (written by ``python -m planner profile``) holds prefill latencies
for several prompt lengths and decode step times for several batch sizes,
measured on one GPU type with one model. The cost model predicts

    prefill latency = overhead_p + FLOPs(prompt) / (tp * peak * mfu)
    decode step     = overhead_d + batch * per_request + bytes read(batch, context) / (tp * bandwidth * mbu)

so a least-squares line through (FLOPs, latency) gives ``mfu`` and the
prefill overhead, and a least-squares plane through (batch, bytes, step)
gives ``mbu``, the decode overhead and the per-request host cost
(``decode_seq_overhead_ms``). Every coefficient is kept >= 0 and every
efficiency <= 1 (a fit faster than the peak keeps the peak and refits the
rest); the fit's R^2 is kept.

The per-request term is fitted only when the decode samples span two context
lengths or more: at one context the bytes a batch reads grow exactly with
the batch, so its cost cannot be told apart from the KV reads, and all of it
is charged to the bytes (as before the term existed). That misattribution
is what made the lab's calibrated decode steps 2-3x too slow at the trace's
contexts (README, "Heterogeneous lab"): on a CPU a small model's step grows
with the requests it handles, not with the KV it reads.

The fit sits with the inputs rather than in ``planner.core``: a cluster file's
``calibration`` list is applied while the file is read (``apply_profile_files``,
called by ``planner.spec.cluster``), and the inputs layer never imports the core.
"""

from __future__ import annotations

import itertools
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
    decode_seq_overhead_ms: float
    prefill_r2: float
    decode_r2: float

    def coefficients(self) -> dict[str, float]:
        return {
            "mfu": self.mfu,
            "mbu": self.mbu,
            "prefill_overhead_ms": self.prefill_overhead_ms,
            "decode_overhead_ms": self.decode_overhead_ms,
            "decode_seq_overhead_ms": self.decode_seq_overhead_ms,
        }


def prefill_flops(model: ModelSpec, prompt_tokens: float) -> float:
    """FLOPs of one prompt through the whole model (the cost model's prefill numerator)."""
    return model.prefill_flops(model.num_layers, prompt_tokens, prompt_tokens**2, last=True)


def decode_bytes(model: ModelSpec, batch: int, context_tokens: float) -> float:
    """Bytes one decode step reads: weights, LM head, and the batch's KV cache."""
    return model.decode_bytes(model.num_layers, batch, context_tokens, last=True)


def _bounded_fit(y: np.ndarray, rate: np.ndarray, min_rate: float,
                 extra: np.ndarray | None = None) -> tuple[float, float, float, float]:
    """Least squares ``y = a + b * rate (+ c * extra)`` with a >= 0, b >= min_rate, c >= 0; returns
    (a, b, c, r2).

    ``min_rate`` is the time per unit at the device's peak (efficiency 1): a fit that would run faster
    than the peak keeps the peak and puts the rest in the other terms. Each subset of the terms above
    their bounds is solved on what the bounds leave, and the best fit within the bounds is kept."""
    residual = y - min_rate * rate
    columns = {"a": np.ones_like(rate), "b": rate, **({"c": extra} if extra is not None else {})}
    best: tuple[dict[str, float], float] = ({}, float(np.sum(residual**2)))  # every term at its bound
    for k in range(1, len(columns) + 1):
        for names in itertools.combinations(columns, k):
            solution, *_ = np.linalg.lstsq(np.stack([columns[n] for n in names], axis=1), residual, rcond=None)
            if min(solution) < 0:
                continue
            sse = float(np.sum((residual - sum(v * columns[n] for n, v in zip(names, solution))) ** 2))
            if sse < best[1]:
                best = (dict(zip(names, map(float, solution))), sse)
    terms, sse = best
    ss = float(np.sum((y - y.mean()) ** 2))
    return terms.get("a", 0.0), min_rate + terms.get("b", 0.0), terms.get("c", 0.0), 1 - sse / ss if ss > 0 else 1.0


def fit_profile(profile: Profile, spec: GpuSpec) -> Fit:
    model, tp = profile.model, profile.tp
    peak_flops, peak_bytes = tp * spec.peak_bf16_tflops * 1e12, tp * spec.memory_bandwidth_gb_per_s * GB
    x = np.array([prefill_flops(model, s.prompt_tokens) for s in profile.prefill])
    y = np.array([s.latency_ms / 1e3 for s in profile.prefill])
    a_p, b_p, _, r2_p = _bounded_fit(y, x, 1 / peak_flops)
    x = np.array([decode_bytes(model, s.batch, s.context_tokens) for s in profile.decode])
    y = np.array([s.step_ms / 1e3 for s in profile.decode])
    contexts = {s.context_tokens for s in profile.decode}
    batch = np.array([float(s.batch) for s in profile.decode]) if len(contexts) > 1 else None
    a_d, b_d, per_request, r2_d = _bounded_fit(y, x, 1 / peak_bytes, batch)
    return Fit(
        mfu=float(min(1 / (b_p * peak_flops), 1.0)),
        mbu=float(min(1 / (b_d * peak_bytes), 1.0)),
        prefill_overhead_ms=a_p * 1e3,
        decode_overhead_ms=a_d * 1e3,
        decode_seq_overhead_ms=per_request * 1e3,
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
