"""The served model's shape, from a preset name, a Hugging Face config.json, or inline fields.

Only what the cost model needs: layer count, widths, heads, vocabulary and the
bytes per parameter. Derived sizes (weights per layer, KV bytes per token) are
properties so that every step of the planner computes them the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.spec.catalog import CONFIG_DIR
from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields, read_json_file

MODEL_PRESETS_PATH = CONFIG_DIR / "models.json"

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float8": "fp8"}
MODEL_FIELDS = frozenset(
    {"num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
     "vocab_size", "mlp", "dtype", "head_dim", "tie_word_embeddings"}
)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    dtype: str = "bfloat16"
    mlp: str = "gated"
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def params_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_size
        attention = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2
        mlp = (3 if self.mlp == "gated" else 2) * h * self.intermediate_size
        return attention + mlp

    @property
    def layer_weight_bytes(self) -> int:
        return self.params_per_layer * self.dtype_bytes

    @property
    def embedding_bytes(self) -> int:
        """Input embedding (first stage)."""
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    @property
    def lm_head_bytes(self) -> int:
        """Output projection (last stage); a tied head still has to be resident there."""
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        extra = self.embedding_bytes + (0 if self.tie_word_embeddings else self.lm_head_bytes)
        return self.num_layers * self.layer_weight_bytes + extra

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_key_value_heads * self.head_size * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_bytes_per_token_per_layer

    def prefill_flops(self, layers: int, tokens: float, tokens_sq: float, last: bool) -> float:
        """FLOPs of a prompt through `layers` layers: 2 per parameter per token for
        the matmuls, 2 * heads * head_size per token pair for attention scores and
        values (`tokens_sq` is the mean of the squared prompt length over a
        workload, or tokens**2 for one prompt); the last stage adds the logits of
        the last token only. The one formula the cost model and its fit share."""
        heads_dim = self.num_attention_heads * self.head_size
        flops = layers * (2 * self.params_per_layer * tokens + 2 * heads_dim * tokens_sq)
        return flops + (2 * self.hidden_size * self.vocab_size if last else 0)

    def decode_bytes(self, layers: int, batch: float, context_tokens: float, last: bool) -> float:
        """Bytes one decode step of `batch` requests reads in `layers` layers: their
        weights, the LM head on the last stage, and the batch's KV cache."""
        weights = layers * self.layer_weight_bytes + (self.lm_head_bytes if last else 0)
        return weights + layers * batch * context_tokens * self.kv_bytes_per_token_per_layer

    def valid_tp(self, tp: int) -> bool:
        """vLLM shards heads: query heads must divide evenly, KV heads divide or replicate."""
        kv = self.num_key_value_heads
        return self.num_attention_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size, "dtype": self.dtype,
            "mlp": self.mlp, "weight_gib": round(self.weight_bytes / 1024**3, 3),
        }


def _normalise_dtype(value: str, path: str) -> str:
    value = _DTYPE_ALIASES.get(value, value)
    if value == "auto":
        value = "bfloat16"
    if value not in DTYPE_BYTES:
        raise PlanInputError(path, f"{value!r} is not a known dtype; allowed: {', '.join(DTYPE_BYTES)}")
    return value


def _spec_from_fields(name: str, f: Fields, base: ModelSpec | None = None) -> ModelSpec:
    values: dict[str, Any] = {}
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "head_dim"):
        if f.has(key):
            values[key] = f.integer(key, minimum=1)
        elif base is None and key not in ("num_key_value_heads", "head_dim"):
            f.raw(key)
    if f.has("dtype"):
        values["dtype"] = _normalise_dtype(f.string("dtype"), f.at("dtype"))
    if f.has("mlp"):
        values["mlp"] = f.string("mlp", choices=("gated", "plain"))
    if f.has("tie_word_embeddings"):
        values["tie_word_embeddings"] = f.boolean("tie_word_embeddings")
    if base is None:
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        spec = ModelSpec(name=name, **values)
    else:
        spec = replace(base, name=name, **values)
    _check_shape(spec, f.path)
    return spec


def _check_shape(spec: ModelSpec, path: str) -> None:
    if not spec.head_dim and spec.hidden_size % spec.num_attention_heads:
        raise PlanInputError(
            f"{path}.hidden_size",
            f"{spec.hidden_size} is not a multiple of num_attention_heads ({spec.num_attention_heads}); give head_dim",
        )
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise PlanInputError(
            f"{path}.num_key_value_heads",
            f"{spec.num_key_value_heads} must divide num_attention_heads ({spec.num_attention_heads})",
        )


@lru_cache(maxsize=1)
def _presets() -> tuple[dict[str, ModelSpec], dict[str, str]]:
    with open(MODEL_PRESETS_PATH, encoding="utf-8") as fh:
        data = json.load(fh)
    f = Fields(data, "models.json")
    models = f.obj("models")
    presets = {name: _spec_from_fields(name, models.obj(name)) for name in models.data}
    return presets, dict(data.get("aliases", {}))


def preset_names() -> list[str]:
    return sorted(_presets()[0])


def model_preset(name: str, field: str = "model.preset") -> ModelSpec:
    presets, aliases = _presets()
    key = aliases.get(name, name)
    if key not in presets:
        lowered = {k.lower(): k for k in presets}
        key = lowered.get(key.lower(), key)
    if key not in presets:
        raise PlanInputError(field, f"{name!r} is not a known preset; known: {', '.join(preset_names())}")
    return presets[key]


def model_from_hf_config(config: dict[str, Any], name: str, field: str) -> ModelSpec:
    """Read the fields the planner needs from a Hugging Face ``config.json`` (Llama, Qwen2, Mistral, OPT...)."""
    f = Fields(config, field)
    if f.has("text_config"):  # multimodal wrappers keep the language model here
        f = f.obj("text_config")
    model_type = str(config.get("model_type", ""))
    layers = f.integer("num_hidden_layers", minimum=1)
    hidden = f.integer("hidden_size", minimum=1)
    heads = f.integer("num_attention_heads", minimum=1)
    kv_heads = f.integer("num_key_value_heads", heads, minimum=1)
    if f.has("intermediate_size"):
        inter = f.integer("intermediate_size", minimum=1)
    elif f.has("ffn_dim"):
        inter = f.integer("ffn_dim", minimum=1)
    else:
        raise PlanInputError(f.at("intermediate_size"), "is required (or ffn_dim, as OPT names it)")
    dtype = f.raw("torch_dtype", None) or f.raw("dtype", None) or "bfloat16"
    spec = ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=f.integer("vocab_size", minimum=1),
        dtype=_normalise_dtype(str(dtype), f.at("torch_dtype")),
        mlp="plain" if model_type in ("opt", "gpt2", "gpt_neox", "falcon", "bloom") else "gated",
        head_dim=int(f.raw("head_dim", 0) or 0),
        tie_word_embeddings=bool(f.raw("tie_word_embeddings", False)),
    )
    _check_shape(spec, field)
    return spec


def parse_model(f: Fields, base_dir: Path) -> ModelSpec:
    """``model``: ``{"preset": NAME}`` or ``{"hf_config": PATH}`` or inline fields, plus overrides.

    A bare string is taken as a preset name.
    """
    if isinstance(f.data, str):  # pragma: no cover - handled by caller
        raise AssertionError
    f.check_keys(MODEL_FIELDS | {"preset", "hf_config", "name"})
    if f.has("preset") and f.has("hf_config"):
        raise PlanInputError(f.at("hf_config"), "give either preset or hf_config, not both")
    if f.has("preset"):
        base = model_preset(f.string("preset"), f.at("preset"))
        name = f.string("name", base.name)
        overrides = {k: v for k, v in f.data.items() if k in MODEL_FIELDS}
        return _spec_from_fields(name, Fields(overrides, f.path), base) if overrides else replace(base, name=name)
    if f.has("hf_config"):
        path = Path(f.string("hf_config"))
        path = path if path.is_absolute() else base_dir / path
        if path.is_dir():
            path = path / "config.json"
        config = read_json_file(path, f.at("hf_config"), what="Hugging Face config")
        name = f.string("name", path.parent.name or "model")
        base = model_from_hf_config(config, name, f.at("hf_config"))
        overrides = {k: v for k, v in f.data.items() if k in MODEL_FIELDS}
        return _spec_from_fields(name, Fields(overrides, f.path), base) if overrides else base
    return _spec_from_fields(f.string("name", "custom"), f)


def model_from_fields(data: dict[str, Any], path: str) -> ModelSpec:
    """A ModelSpec from the inline field names (as ``ModelSpec.to_json`` writes them)."""
    f = Fields(data, path)
    allowed = MODEL_FIELDS | {"name", "weight_gib"}
    f.check_keys(allowed)
    inline = {k: v for k, v in data.items() if k in MODEL_FIELDS}
    return _spec_from_fields(f.string("name", "model"), Fields(inline, path))
