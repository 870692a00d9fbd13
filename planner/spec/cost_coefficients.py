"""The fitted cost model's coefficients (``configs/cost_coefficients.json``, schema ``hexserve.cost_coefficients``).

The planner models a catalog GPU whose ``cost_form`` is ``"fitted"`` with the
sum of terms in ``planner.core.costmodel`` (one physical quantity at the GPU's
peak rate each, times a coefficient). The coefficients are fitted once, across
GPUs and models, to the published measurements under ``configs/measured/``
(``python -m benchmarks.costmodel_fit --write-coefficients``), and the file
records what they were fitted on. A test refits and checks the file.

Every coefficient is dimensionless (a multiple of a peak-rate time or of the
link's latency) except the fixed ``*_s`` terms, which are seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields

COST_COEFFICIENTS_PATH = Path(__file__).resolve().parents[2] / "configs" / "cost_coefficients.json"
COST_COEFFICIENTS_SCHEMA = "hexserve.cost_coefficients"

# The order of each phase's terms; the first is the fixed per-pass / per-step cost in seconds.
PREFILL_TERMS = ("per_pass_s", "per_layer_s", "matmul", "attention", "weights", "allreduce_bytes",
                 "allreduce_latency")
DECODE_TERMS = ("per_step_s", "per_layer_s", "weights", "kv_read", "per_seq_layer_s", "matmul", "allreduce_bytes",
                "allreduce_latency")


@dataclass(frozen=True, slots=True)
class CostCoefficients:
    """Coefficients of both phases, in ``PREFILL_TERMS`` / ``DECODE_TERMS`` order."""

    prefill: tuple[float, ...]
    decode: tuple[float, ...]

    @property
    def per_pass_s(self) -> float:
        return self.prefill[0]

    @property
    def per_step_s(self) -> float:
        return self.decode[0]

    def to_json(self) -> dict[str, dict[str, float]]:
        return {"prefill": dict(zip(PREFILL_TERMS, self.prefill)), "decode": dict(zip(DECODE_TERMS, self.decode))}


def _terms(f: Fields, names: tuple[str, ...]) -> tuple[float, ...]:
    f.check_keys(set(names))
    return tuple(f.number(name, minimum=0) for name in names)


def parse_cost_coefficients(data: Any, path: str = "cost_coefficients") -> CostCoefficients:
    f = Fields(data, path)
    f.check_keys({"schema", "provenance", "prefill", "decode"})
    if f.string("schema") != COST_COEFFICIENTS_SCHEMA:
        raise PlanInputError(f.at("schema"), f"must be {COST_COEFFICIENTS_SCHEMA!r}")
    return CostCoefficients(_terms(f.obj("prefill"), PREFILL_TERMS), _terms(f.obj("decode"), DECODE_TERMS))


@lru_cache(maxsize=2)
def load_cost_coefficients(path: str = str(COST_COEFFICIENTS_PATH)) -> CostCoefficients:
    with open(path, encoding="utf-8") as fh:
        return parse_cost_coefficients(json.load(fh), Path(path).name)
