"""The GPU catalog: what each accelerator type can do and what it costs.

The defaults live in ``configs/gpu_catalog.json`` (versioned, measured or
published numbers); a cluster file may override any field of any entry, or
add a type of its own, under its ``catalog`` key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.spec.cost_coefficients import CostCoefficients, load_cost_coefficients
from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CATALOG_PATH = CONFIG_DIR / "gpu_catalog.json"
CATALOG_SCHEMA = "hexserve.gpu_catalog"

GIB = 1024**3
GB = 1e9


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One accelerator type. Rates are peaks. How long work takes on it is modelled one of two ways:

    - ``fitted`` set (``cost_form: "fitted"``): the sum of terms whose coefficients were fitted to published
      measurements across GPUs and models (``planner.spec.cost_coefficients``);
    - ``fitted`` None (``"roofline"``): ``mfu``/``mbu`` say how much of the peaks vLLM reaches, plus fixed
      per-pass overheads; what ``planner calibrate`` fits from a profile of this type.
    """

    name: str
    peak_bf16_tflops: float
    memory_gib: float
    memory_bandwidth_gb_per_s: float
    price_per_hour: float
    intra_node_bandwidth_gb_per_s: float
    intra_node_latency_us: float = 10.0
    mfu: float = 0.5
    mbu: float = 0.75
    prefill_overhead_ms: float = 5.0
    decode_overhead_ms: float = 2.0
    # Host work per request per decode step (scheduling, sampling, output processing, streaming): what makes
    # a small model's step grow with the batch on a CPU where its KV reads cannot (planner.spec.calibration).
    decode_seq_overhead_ms: float = 0.0
    fitted: CostCoefficients | None = None
    price_source: str = ""  # where price_per_hour comes from: offer, address, date seen (catalog), or "cluster file"
    # The engine overlaps its host-side work per pass (scheduling, input preparation, the request's own
    # handling) with the device's compute: true for GPUs; false where the same cores do both (a CPU, a
    # lab device), so a prefill worker's pass costs its overhead in throughput too (costmodel.prefill_pass).
    host_work_overlaps: bool = True

    @property
    def cost_form(self) -> str:
        return "roofline" if self.fitted is None else "fitted"

    @property
    def flops_per_s(self) -> float:
        return self.peak_bf16_tflops * 1e12 * self.mfu

    @property
    def mem_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gb_per_s * GB * self.mbu

    @property
    def intra_node_bytes_per_s(self) -> float:
        return self.intra_node_bandwidth_gb_per_s * GB

    @property
    def intra_node_latency_s(self) -> float:
        return self.intra_node_latency_us / 1e6

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


_REQUIRED = ("peak_bf16_tflops", "memory_gib", "memory_bandwidth_gb_per_s", "price_per_hour", "intra_node_bandwidth_gb_per_s")
_OPTIONAL = {
    "intra_node_latency_us": 10.0,
    "mfu": 0.5,
    "mbu": 0.75,
    "prefill_overhead_ms": 5.0,
    "decode_overhead_ms": 2.0,
    "decode_seq_overhead_ms": 0.0,
}
COST_FORMS = ("fitted", "roofline")
_ROOFLINE_ONLY = ("mfu", "mbu", "prefill_overhead_ms", "decode_overhead_ms", "decode_seq_overhead_ms")
GPU_FIELDS = frozenset(_REQUIRED) | frozenset(_OPTIONAL) | {"notes", "cost_form", "price_source", "host_work_overlaps"}
PRICE_SOURCE_FIELDS = frozenset({"offer", "url", "seen", "via"})


def _price_source(f: Fields) -> str:
    """One line naming the price's public source: offer, address, the date it was seen there, and the page
    that quoted it when it was not read at the vendor itself."""
    source = f.obj("price_source")
    source.check_keys(PRICE_SOURCE_FIELDS)
    seen = source.string("seen")
    if not re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", seen):
        raise PlanInputError(source.at("seen"), f"is {seen!r}; give the date the price was seen as YYYY-MM-DD "
                                                "(YYYY-MM where the page gives only the month)")
    text = f"{source.string('offer')}, {source.string('url')}, seen {seen}"
    return text + (f" (as quoted by {source.string('via')})" if source.has("via") else "")


def _read_values(f: Fields, base: GpuSpec | None) -> dict[str, Any]:
    f.check_keys(GPU_FIELDS)
    values: dict[str, Any] = {}
    form = f.string("cost_form", choices=COST_FORMS) if f.has("cost_form") else (base.cost_form if base else "roofline")
    for key in _ROOFLINE_ONLY:
        if form == "fitted" and f.has(key):
            raise PlanInputError(f.at(key), "is a roofline coefficient, but this type uses the fitted cost model; "
                                            "also set cost_form to \"roofline\" to model it with mfu/mbu/overheads")
    values["fitted"] = load_cost_coefficients() if form == "fitted" else None
    if f.has("price_source"):
        values["price_source"] = _price_source(f)
    if f.has("host_work_overlaps"):
        values["host_work_overlaps"] = f.boolean("host_work_overlaps")
    for key in _REQUIRED + tuple(_OPTIONAL):
        if f.has(key):
            if key in ("mfu", "mbu"):
                values[key] = f.number(key, above=0, maximum=1)
            elif key == "price_per_hour" or key.endswith("overhead_ms") or key.endswith("latency_us"):
                values[key] = f.number(key, minimum=0)
            else:
                values[key] = f.number(key, above=0)
        elif base is None and key in _REQUIRED:
            f.raw(key)  # raises "is required"
    return values


class Catalog:
    """GPU types by name, with aliases. Lookups fail with the list of known names."""

    def __init__(self, gpus: dict[str, GpuSpec], aliases: dict[str, str] | None = None) -> None:
        self.gpus = dict(gpus)
        self.aliases = dict(aliases or {})

    def names(self) -> list[str]:
        return sorted(self.gpus)

    def resolve(self, name: str, field: str) -> GpuSpec:
        key = self.aliases.get(name, name)
        if key not in self.gpus:
            raise PlanInputError(
                field, f"{name!r} is not in the GPU catalog; known: {', '.join(self.names())} "
                f"(or add it under 'catalog' with {', '.join(_REQUIRED)})"
            )
        return self.gpus[key]

    def with_overrides(self, f: Fields) -> Catalog:
        """A copy with the entries of a cluster file's ``catalog`` object applied."""
        gpus = dict(self.gpus)
        for name in f.data:
            entry = f.obj(name)
            key = self.aliases.get(name, name)
            base = gpus.get(key)
            values = _read_values(entry, base)
            if "price_per_hour" in values and "price_source" not in values:
                values["price_source"] = "cluster file"  # the catalog's source no longer applies
            gpus[key] = replace(base, **values) if base else GpuSpec(name=key, **values)
        return Catalog(gpus, self.aliases)

    def with_calibration(self, gpu_type: str, coefficients: dict[str, float]) -> Catalog:
        """A copy with ``gpu_type`` modelled by the roofline form with measured coefficients (a profile of one
        GPU type and model is too small to refit the fitted form's terms)."""
        gpus = dict(self.gpus)
        gpus[gpu_type] = replace(gpus[gpu_type], fitted=None, **coefficients)
        return Catalog(gpus, self.aliases)


def parse_catalog(data: Any, path: str = "catalog") -> Catalog:
    f = Fields(data, path)
    f.check_keys({"schema", "schema_version", "notes", "gpus", "aliases"})
    if f.has("schema") and f.string("schema") != CATALOG_SCHEMA:
        raise PlanInputError(f.at("schema"), f"must be {CATALOG_SCHEMA!r}")
    gpus_f = f.obj("gpus")
    gpus = {name: GpuSpec(name=name, **_read_values(gpus_f.obj(name), None)) for name in gpus_f.data}
    aliases = f.raw("aliases", {})
    for alias, target in aliases.items():
        if target not in gpus:
            raise PlanInputError(f.at(f"aliases.{alias}"), f"points at unknown type {target!r}")
    return Catalog(gpus, aliases)


@lru_cache(maxsize=4)
def _load_catalog_file(path: str) -> Catalog:
    with open(path, encoding="utf-8") as fh:
        return parse_catalog(json.load(fh), path=Path(path).name)


def default_catalog() -> Catalog:
    """The catalog shipped in ``configs/gpu_catalog.json``."""
    return _load_catalog_file(str(DEFAULT_CATALOG_PATH))
