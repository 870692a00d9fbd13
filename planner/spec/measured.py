"""Published latency measurements of real engines (``configs/measured/*.json``, schema ``hexserve.measured``).

Each file is one source, with its provenance (repository, path, commit,
paper, engine, what the numbers are and how hexserve reads them). Two kinds
of content:

- ``points``: measurements as published (e.g. Helix's per-layer profiles):
  ``{"gpu", "tp", "layers", "phase": "prefill", "tokens", "ms"}`` or
  ``{..., "phase": "decode", "batch", "context_tokens", "ms"}``; ``layers``
  is how many decoder layers the time covers (absent: the whole model);
- ``fits``: the source's own published least-squares fits of its
  measurements (DistServe's profiler files), evaluated on the file's ``grid``
  inside the profiled range.

The cost model's fit (``planner.core.costfit``) and ``benchmarks.costmodel_fit``
read them through ``load_measured``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.spec.catalog import CONFIG_DIR
from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields
from planner.spec.model import ModelSpec, model_from_fields, model_preset

MEASURED_DIR = CONFIG_DIR / "measured"
MEASURED_SCHEMA = "hexserve.measured"


@dataclass(frozen=True, slots=True)
class MeasuredPoint:
    """One measured (or source-fitted) latency: a prefill pass or a decode step of one replica."""

    source: str
    gpu: str  # catalog name
    model: ModelSpec
    tp: int
    layers: int | None  # decoder layers the time covers; None: the whole model (embeddings and LM head too)
    phase: str  # "prefill" | "decode"
    tokens: int = 0  # prefill: prompt tokens in the pass
    batch: int = 0  # decode: requests in the step
    context_tokens: float = 0.0  # decode: mean context per request
    ms: float = 0.0
    engine: str = ""  # what ran it, from the source's provenance


def _model(data: Any, path: str) -> ModelSpec:
    if "preset" in data:
        return model_preset(data["preset"], f"{path}.preset")
    return model_from_fields(data, path)


def _from_fits(doc: dict, source: str) -> list[MeasuredPoint]:
    grid = doc["grid"]
    out: list[MeasuredPoint] = []
    for k, fit in enumerate(doc["fits"]):
        model, tp = _model(fit["model"], f"{source}.fits[{k}].model"), int(fit["tp"])
        a, b, c = fit["prefill_ms_coefficients"]
        for s in grid["prefill_tokens"]:
            out.append(MeasuredPoint(source, doc["gpu"], model, tp, None, "prefill", tokens=s, ms=a + b * s + c * s * s))
        for batch in grid["decode_batch"]:
            key = "large" if batch >= fit["decode_large_batch_from"] else "small"
            a, b, c = fit[f"decode_ms_coefficients_{key}_batch"]
            for ctx in grid["decode_context_tokens"]:
                out.append(MeasuredPoint(source, doc["gpu"], model, tp, None, "decode", batch=batch,
                                         context_tokens=ctx, ms=a + b * batch * ctx + c * batch))
    return out


def _from_points(doc: dict, source: str) -> list[MeasuredPoint]:
    model = _model(doc["model"], f"{source}.model")
    assumed_ctx = doc.get("assumed_context_tokens")
    out = []
    for p in doc["points"]:
        common = dict(source=source, gpu=p["gpu"], model=model, tp=int(p["tp"]), layers=p.get("layers"),
                      phase=p["phase"], ms=float(p["ms"]))
        if p["phase"] == "prefill":
            out.append(MeasuredPoint(tokens=int(p["tokens"]), **common))
        else:
            ctx = p.get("context_tokens") or assumed_ctx
            out.append(MeasuredPoint(batch=int(p["batch"]), context_tokens=float(ctx), **common))
    return out


def load_measured(path: Path | str) -> list[MeasuredPoint]:
    """The points of one ``hexserve.measured`` file (positive latencies only)."""
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    f = Fields(doc, path.name)
    if f.string("schema") != MEASURED_SCHEMA:
        raise PlanInputError(f.at("schema"), f"must be {MEASURED_SCHEMA!r}")
    source = f.string("source")
    points = _from_fits(doc, source) if "fits" in doc else _from_points(doc, source)
    engine = str(doc.get("provenance", {}).get("engine", ""))
    return [dataclasses.replace(p, engine=engine) for p in points if p.ms > 0]


def load_all_measured(directory: Path = MEASURED_DIR) -> list[MeasuredPoint]:
    return [p for path in sorted(directory.glob("*.json")) for p in load_measured(path)]
