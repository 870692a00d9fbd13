"""Profile files: latencies measured on one GPU type with one model (``hexserve.profile``).

``python -m planner profile`` writes one; a cluster file names them under
``calibration`` and ``planner.spec.calibration`` fits the cost model's
coefficients to them. Prefill samples are whole-prompt latencies at several
prompt lengths; decode samples are step times at several batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields, read_json_file
from planner.spec.model import ModelSpec, model_from_fields

PROFILE_SCHEMA = "hexserve.profile"
PROFILE_VERSION = 1


@dataclass(frozen=True, slots=True)
class PrefillSample:
    prompt_tokens: int
    latency_ms: float


@dataclass(frozen=True, slots=True)
class DecodeSample:
    batch: int
    context_tokens: float
    step_ms: float


@dataclass(frozen=True, slots=True)
class Profile:
    gpu_type: str
    tp: int
    model: ModelSpec
    prefill: tuple[PrefillSample, ...]
    decode: tuple[DecodeSample, ...]
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": PROFILE_SCHEMA,
            "schema_version": PROFILE_VERSION,
            "gpu_type": self.gpu_type,
            "tp": self.tp,
            "model": self.model.to_json(),
            "source": self.source,
            "prefill": [{"prompt_tokens": s.prompt_tokens, "latency_ms": round(s.latency_ms, 4)} for s in self.prefill],
            "decode": [
                {"batch": s.batch, "context_tokens": s.context_tokens, "step_ms": round(s.step_ms, 4)}
                for s in self.decode
            ],
        }


def parse_profile(data: Any, path: str = "profile") -> Profile:
    f = Fields(data, path)
    f.check_keys({"schema", "schema_version", "gpu_type", "tp", "model", "source", "prefill", "decode"})
    if f.string("schema") != PROFILE_SCHEMA:
        raise PlanInputError(f.at("schema"), f"must be {PROFILE_SCHEMA!r}")
    if f.integer("schema_version") != PROFILE_VERSION:
        raise PlanInputError(f.at("schema_version"), f"this planner reads version {PROFILE_VERSION}")
    prefill = []
    for p, entry in f.items("prefill", min_items=2):
        e = Fields(entry, p)
        e.check_keys({"prompt_tokens", "latency_ms"})
        prefill.append(PrefillSample(e.integer("prompt_tokens", minimum=1), e.number("latency_ms", above=0)))
    decode = []
    for p, entry in f.items("decode", min_items=2):
        e = Fields(entry, p)
        e.check_keys({"batch", "context_tokens", "step_ms"})
        decode.append(DecodeSample(e.integer("batch", minimum=1), e.number("context_tokens", minimum=0),
                                   e.number("step_ms", above=0)))
    return Profile(
        gpu_type=f.string("gpu_type"),
        tp=f.integer("tp", 1, minimum=1),
        model=model_from_fields(f.raw("model"), f.at("model")),
        prefill=tuple(prefill),
        decode=tuple(decode),
        source=f.raw("source", {}),
    )


def load_profile(path: Path, field: str = "calibration") -> Profile:
    return parse_profile(read_json_file(path, field, what="profile"), path=field)
