"""``python -m planner estimate``: ask the cost model for one prediction, to hold it against a measurement.

    python -m planner estimate --gpu H100 --tp 4 --model Llama-2-70B --prefill-tokens 2048
    python -m planner estimate --gpu H100 --tp 4 --model Llama-2-70B --decode-batch 32 --context 640 --json

One replica on ``tp`` GPUs of one node (one pipeline stage), timed by the
functions the planner's search and the simulator use
(``costmodel.prefill_pass`` / ``decode_step``, per-pass overheads included).
``--fitted`` adds what the richer form of ``planner.core.costfit``, fitted to
the published measurements in ``configs/measured/``, predicts (the form
``benchmarks.costmodel_fit`` evaluates; the planner does not use it yet).
Numbers are read here rather than by argparse so a bad value fails with one
line that names the flag (exit status 2, as every planner input error).
"""

from __future__ import annotations

import argparse
import json

from planner.core import costfit
from planner.core import costmodel as cm
from planner.spec.catalog import GIB, GpuSpec, default_catalog
from planner.spec.errors import PlanInputError
from planner.spec.measured import MeasuredPoint, load_all_measured
from planner.spec.model import ModelSpec, model_preset


def _positive_int(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise PlanInputError(flag, f"must be a positive integer, got {value!r}") from None
    if number < 1:
        raise PlanInputError(flag, f"must be a positive integer, got {value!r}")
    return number


def estimate(gpu: GpuSpec, model: ModelSpec, tp: int, prefill_tokens: int | None, decode_batch: int | None,
             context_tokens: int | None) -> dict:
    """The predictions asked for, in milliseconds, with what they assume."""
    stage = cm.Stage.replica(gpu, tp, model.num_layers)
    weights_per_gpu = cm.stage_weight_bytes(model, model.num_layers, True, True) / tp
    out: dict = {"gpu": gpu.name, "tp": tp, "model": model.name,
                 "weights_gib_per_gpu": round(weights_per_gpu / GIB, 2),
                 "weights_fit": bool(weights_per_gpu < gpu.memory_bytes)}
    if prefill_tokens is not None:
        latency_s, _ = cm.prefill_pass(model, [stage], prefill_tokens, prefill_tokens**2)
        out["prefill"] = {"tokens": prefill_tokens, "latency_ms": round(latency_s * 1e3, 3)}
    if decode_batch is not None:
        step_s = cm.decode_step(model, [stage], decode_batch, context_tokens)
        out["decode"] = {"batch": decode_batch, "context_tokens": context_tokens,
                         "step_ms": round(step_s * 1e3, 3)}
    return out


def _whole(p: MeasuredPoint) -> MeasuredPoint:
    scale = 1 if p.layers is None else p.model.num_layers / p.layers
    return MeasuredPoint(p.source, p.gpu, p.model, p.tp, None, p.phase, p.tokens, p.batch, p.context_tokens,
                         p.ms * scale)


def fitted_estimate(gpu: GpuSpec, model: ModelSpec, tp: int, prefill_tokens: int | None, decode_batch: int | None,
                    context_tokens: int | None) -> dict:
    """The fitted form's predictions (ms), fitted on every file in configs/measured/ (per-layer times scaled)."""
    catalog = default_catalog()
    points = [_whole(p) for p in load_all_measured()]
    fitted = costfit.fit(
        [(costfit.Shape(catalog.resolve(p.gpu, "gpu"), p.model, p.tp), p.tokens, p.ms / 1e3)
         for p in points if p.phase == "prefill"],
        [(costfit.Shape(catalog.resolve(p.gpu, "gpu"), p.model, p.tp), p.batch, p.context_tokens, p.ms / 1e3)
         for p in points if p.phase == "decode"])
    shape = costfit.Shape(gpu, model, tp)
    out: dict = {"sources": sorted({p.source for p in points})}
    if prefill_tokens is not None:
        out["prefill_latency_ms"] = round(fitted.prefill_s(shape, prefill_tokens) * 1e3, 3)
    if decode_batch is not None:
        out["decode_step_ms"] = round(fitted.decode_s(shape, decode_batch, context_tokens) * 1e3, 3)
    return out


def cmd_estimate(args: argparse.Namespace) -> int:
    gpu = default_catalog().resolve(args.gpu, "--gpu")
    model = model_preset(args.model, "--model")
    tp = _positive_int(args.tp, "--tp")
    if not model.valid_tp(tp):
        raise PlanInputError("--tp", f"{model.name} has {model.num_attention_heads} query and "
                             f"{model.num_key_value_heads} KV heads; {tp} does not divide them")
    tokens = _positive_int(args.prefill_tokens, "--prefill-tokens")
    batch = _positive_int(args.decode_batch, "--decode-batch")
    context = _positive_int(args.context, "--context")
    if tokens is None and batch is None:
        raise PlanInputError("--prefill-tokens", "give --prefill-tokens N and/or --decode-batch B --context C")
    if batch is not None and context is None:
        raise PlanInputError("--context", "--decode-batch needs the mean context length in tokens")
    if context is not None and batch is None:
        raise PlanInputError("--decode-batch", "--context needs the decode batch size")
    result = estimate(gpu, model, tp, tokens, batch, context)
    if args.fitted:
        result["fitted"] = fitted_estimate(gpu, model, tp, tokens, batch, context)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{model.name} on {tp}x {gpu.name} ({result['weights_gib_per_gpu']} GiB of weights per GPU"
          f"{'' if result['weights_fit'] else ', DOES NOT FIT'})")
    if "prefill" in result:
        print(f"  prefill of {tokens} tokens: {result['prefill']['latency_ms']:.1f} ms")
    if "decode" in result:
        print(f"  decode step, batch {batch} at {context} tokens of context: {result['decode']['step_ms']:.2f} ms")
    if args.fitted:
        fitted = result["fitted"]
        parts = [f"prefill {fitted['prefill_latency_ms']:.1f} ms" if "prefill_latency_ms" in fitted else "",
                 f"decode step {fitted['decode_step_ms']:.2f} ms" if "decode_step_ms" in fitted else ""]
        print(f"  fitted form (configs/measured/, not used by the planner): {', '.join(p for p in parts if p)}")
    return 0


def add_estimate_parser(sub) -> None:
    p = sub.add_parser("estimate", help="predicted prefill latency or decode step time of one replica")
    p.add_argument("--gpu", required=True, help="catalog GPU type (python -m planner catalog)")
    p.add_argument("--model", required=True, help="model preset (python -m planner catalog)")
    p.add_argument("--tp", default="1", help="tensor-parallel degree (default 1)")
    p.add_argument("--prefill-tokens", default=None, help="prompt length: print the prefill latency")
    p.add_argument("--decode-batch", default=None, help="requests in the batch: print the decode step time")
    p.add_argument("--context", default=None, help="mean context (prompt + tokens so far) per request")
    p.add_argument("--fitted", action="store_true",
                   help="also the fitted form's prediction (fitted to configs/measured/; not used by the planner)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_estimate)
