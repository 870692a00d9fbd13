"""Cost providers for the simulator: the planner's cost model, or a measured profile.

`AnalyticCosts` calls the planner's own pass functions (`planner.core.costmodel.prefill_pass`
and `decode_step`, per-pass overheads included), so the simulator and the
planner's search time the same plan the same way. A prefill batch is one pass
over the batch's token sum (its attention term the sum of squared prompt
lengths): the weights are read once per pass, the batching credit a
per-prompt estimate leaves out. Decode steps are cached per context bucket.

`ProfileCosts` uses least-squares fits of measured latencies:
prefill = a + b*tokens + c*tokens^2 and decode step = a + b*batch + c*context,
clamped at the smallest measured value, for the CPU validation where the
analytical GPU model does not apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from planner.core import costmodel
from planner.sim.types import SimGroup
from planner.spec.model import ModelSpec


@dataclass(slots=True)
class AnalyticCosts:
    model: ModelSpec
    context_bucket_tokens: int = 256  # decode steps are cached per context bucket

    def prefill_batch_s(self, group: SimGroup, sum_tokens: int, sum_sq_tokens: int,
                        own_step: bool = False) -> tuple[float, float]:
        return costmodel.prefill_pass(self.model, group.stages, float(sum_tokens), float(sum_sq_tokens), own_step)

    def decode_step_s(self, group: SimGroup, batch: int, sum_context_tokens: int) -> float:
        bucket = self.context_bucket_tokens
        mean_ctx = max(1, round(sum_context_tokens / max(batch, 1) / bucket)) * bucket
        return _decode_step_cached(self.model, group, batch, mean_ctx)


@lru_cache(maxsize=200_000)
def _decode_step_cached(model: ModelSpec, group: SimGroup, batch: int, mean_ctx: int) -> float:
    return costmodel.decode_step(model, group.stages, batch, float(mean_ctx))


def fit_linear(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Least-squares coefficients of y = c0 + c1*x1 + c2*x2 ..., negative slopes set to 0."""
    a = np.column_stack([np.ones(len(ys))] + [np.asarray(c, dtype=float) for c in zip(*xs)])
    coef, *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=float), rcond=None)
    coef = [float(c) for c in coef]
    return [coef[0]] + [max(0.0, c) for c in coef[1:]]


@dataclass(slots=True)
class ProfileCosts:
    """Costs from measured points; the same fit for every group (one worker type).

    Profile JSON: {"prefill": [{"tokens": s, "latency_s": t}, ...],
                   "decode": [{"batch": b, "context_tokens": c, "step_s": t}, ...]}
    """

    prefill_coef: list[float]  # a + b*s + c*s^2 (seconds)
    decode_coef: list[float]  # a + b*batch + c*sum_context (seconds)
    prefill_floor_s: float = 0.0
    decode_floor_s: float = 0.0

    @classmethod
    def from_points(cls, prefill: list[dict], decode: list[dict]) -> "ProfileCosts":
        if len(prefill) < 3 or len(decode) < 3:
            raise ValueError("a profile needs at least 3 prefill and 3 decode points to fit")
        pc = fit_linear([[p["tokens"], p["tokens"] ** 2] for p in prefill], [p["latency_s"] for p in prefill])
        dc = fit_linear([[d["batch"], d["batch"] * d["context_tokens"]] for d in decode],
                        [d["step_s"] for d in decode])
        return cls(pc, dc, min(p["latency_s"] for p in prefill), min(d["step_s"] for d in decode))

    @classmethod
    def load(cls, path: str | Path) -> "ProfileCosts":
        data = json.loads(Path(path).read_text())
        for key in ("prefill", "decode"):
            if key not in data:
                raise ValueError(f"{path}: profile has no {key!r} list; see planner.sim.costs.ProfileCosts")
        return cls.from_points(data["prefill"], data["decode"])

    def prefill_batch_s(self, group: SimGroup, sum_tokens: int, sum_sq_tokens: int,
                        own_step: bool = False) -> tuple[float, float]:
        a, b, c = self.prefill_coef  # measured end to end: busy is the whole latency either way
        t = max(self.prefill_floor_s, a + b * sum_tokens + c * sum_sq_tokens)
        return t, t

    def decode_step_s(self, group: SimGroup, batch: int, sum_context_tokens: int) -> float:
        a, b, c = self.decode_coef
        return max(self.decode_floor_s, a + b * batch + c * sum_context_tokens)
