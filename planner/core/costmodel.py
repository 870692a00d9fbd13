"""Analytical cost model: how long prefill, a decode step and a KV transfer take.

Every function is pure and takes SI units (seconds, bytes, FLOPs).

- Prefill is compute-bound: a stage's time is the roofline
  ``max(FLOPs / (tp * peak * mfu), weight bytes / (tp * bandwidth * mbu))``
  plus two ring all-reduces per layer over the intra-node link; stages hand
  activations to the next over the link between their nodes (an alpha-beta
  term: latency + bytes / bandwidth).
- A decode step is memory-bandwidth-bound: every step reads the stage's
  weights and the KV cache of every request in the batch.
- A KV transfer moves ``kv_bytes_per_token * prompt`` bytes; each GPU sends
  its own shard (its layers and heads) over its own link, in parallel.

That is the roofline form, with ``mfu``, ``mbu`` and the per-pass overheads of
the GPU catalog (fitted to a profile of one type by ``planner.spec.calibration``).
A catalog type whose ``cost_form`` is "fitted" (every datacenter GPU in
``configs/gpu_catalog.json``) is modelled instead by a sum of terms, each a
physical quantity at the GPU's peak rate times a coefficient fitted across
GPUs and models to published measurements (``prefill_terms`` /
``decode_terms``; coefficients in ``configs/cost_coefficients.json``, fitted
by ``planner.core.costfit``): per pass, per layer, matmul and attention FLOPs,
weight and KV bytes, sequences x layers, all-reduce bytes and latency;
where published vLLM measurements cover a (GPU, model, TP), corrected to
them (``planner.core.profiles``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.core import profiles
from planner.spec.catalog import GB, GpuSpec
from planner.spec.model import ModelSpec
from planner.spec.workload import Workload


def allreduce_time(num_bytes: float, tp: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce of ``num_bytes`` over ``tp`` ranks: 2(tp-1) steps of bytes/tp each."""
    if tp <= 1:
        return 0.0
    return 2 * (tp - 1) / tp * num_bytes / bandwidth + 2 * (tp - 1) * latency


def link_time(num_bytes: float, bandwidth: float, latency: float) -> float:
    """Alpha-beta cost of one message."""
    return latency + num_bytes / bandwidth


def activation_bytes(model: ModelSpec, tokens: float) -> float:
    return tokens * model.hidden_size * model.dtype_bytes


def stage_weight_bytes(model: ModelSpec, layers: int, first: bool, last: bool) -> float:
    """Weights a pipeline stage holds (all its TP ranks together)."""
    extra = (model.embedding_bytes if first else 0) + (model.lm_head_bytes if last else 0)
    return layers * model.layer_weight_bytes + extra


# -- memory: the one model the strategies and the simulator both use --------------------------------
def kv_replication(model: ModelSpec, tp: int) -> float:
    """Copies of each KV head a stage's ``tp`` ranks hold.

    vLLM shards KV heads across TP ranks, and every rank needs at least one: with
    more ranks than KV heads each head is replicated ``tp / kv_heads`` times.
    """
    return max(1.0, tp / model.num_key_value_heads)


def stage_kv_bytes_per_token(model: ModelSpec, layers: int, tp: int) -> float:
    """KV bytes one token of context costs a stage, over all its ``tp`` GPUs (replicated heads included)."""
    return layers * model.kv_bytes_per_token_per_layer * kv_replication(model, tp)


def stage_free_bytes(model: ModelSpec, usable_bytes_per_gpu: float, tp: int, layers: int, first: bool,
                     last: bool) -> float:
    """Memory a stage's ``tp`` GPUs have left for the KV cache once the weights are in (< 0: they do not fit)."""
    return tp * usable_bytes_per_gpu - stage_weight_bytes(model, layers, first, last)


def stage_bytes_per_gpu(model: ModelSpec, layers: int, tp: int, first: bool, last: bool, kv_tokens: float) -> float:
    """Memory one GPU of a stage needs: its share of the weights and of ``kv_tokens`` tokens of KV cache."""
    kv = kv_tokens * stage_kv_bytes_per_token(model, layers, tp)
    return (stage_weight_bytes(model, layers, first, last) + kv) / tp


# -- the fitted form: a sum of terms, each a physical quantity at peak rate times a fitted coefficient -----
def _allreduce_terms(model: ModelSpec, tokens: float, tp: int, layers, intra_bandwidth: float,
                     intra_latency: float) -> tuple:
    """(all-reduce bytes over the link in seconds at its bandwidth, all-reduce steps x link latency):
    two ring all-reduces per layer."""
    per_layer = 2  # ring all-reduces, each split into its bandwidth and its latency part
    return (layers * per_layer * allreduce_time(activation_bytes(model, tokens), tp, intra_bandwidth, 0.0),
            layers * per_layer * allreduce_time(0.0, tp, 1.0, intra_latency))


def prefill_terms(model: ModelSpec, tokens: float, sq_tokens: float, gpu: GpuSpec, tp: int, layers, first: bool,
                  last: bool, intra_bandwidth: float, intra_latency: float) -> tuple:
    """A prefill stage's terms after the per-pass one, in ``PREFILL_TERMS[1:]`` order (``layers`` may be an
    array): layers, matmul and attention FLOPs / peak, weight bytes / bandwidth, all-reduce bytes / link
    bandwidth and steps x link latency. The one formula the planner, the simulator and the fit share."""
    peak = gpu.peak_bf16_tflops * 1e12 * tp
    bandwidth = gpu.memory_bandwidth_gb_per_s * GB * tp
    matmul = model.prefill_flops(layers, tokens, 0.0, last)  # the model's one formula, split in its two parts
    attention = model.prefill_flops(layers, 0.0, sq_tokens, False)
    weights = stage_weight_bytes(model, layers, first, last)
    comm = _allreduce_terms(model, tokens, tp, layers, intra_bandwidth, intra_latency)
    return (layers, matmul / peak, attention / peak, weights / bandwidth, *comm)


def decode_terms(model: ModelSpec, batch: float, context_tokens: float, gpu: GpuSpec, tp: int, layers, last: bool,
                 intra_bandwidth: float, intra_latency: float) -> tuple:
    """A decode step's terms after the per-step one, in ``DECODE_TERMS[1:]`` order: layers, weight and KV bytes
    read / bandwidth, sequences x layers (attention metadata, sampling), matmul FLOPs / peak, all-reduces."""
    peak = gpu.peak_bf16_tflops * 1e12 * tp
    bandwidth = gpu.memory_bandwidth_gb_per_s * GB * tp
    weights = model.decode_bytes(layers, 0.0, context_tokens, last)  # no request: the weights alone
    kv = batch * context_tokens * stage_kv_bytes_per_token(model, layers, tp)
    matmul = batch * (layers * 2 * model.params_per_layer + (2 * model.hidden_size * model.vocab_size if last else 0))
    comm = _allreduce_terms(model, batch, tp, layers, intra_bandwidth, intra_latency)
    return (layers, weights / bandwidth, kv / bandwidth, batch * layers, matmul / peak, *comm)


def fitted_time(coefficients: tuple[float, ...], terms: tuple):
    """A stage's time in the fitted form: its terms (after the constant) times their coefficients."""
    return sum(c * t for c, t in zip(coefficients[1:], terms))


@lru_cache(maxsize=256)
def measured_correction(gpu: GpuSpec, model: ModelSpec, tp: int) -> profiles.Correction:
    """measured / fitted at each of vLLM's measurements of a `profiles.covered` (gpu, model, tp): the stage's
    fitted time for the layers the point timed (a whole-model point without the per-pass constant, which is
    the pass's, not a stage's)."""
    link = (gpu.intra_node_bytes_per_s, gpu.intra_node_latency_s)
    prefill: dict[float, float] = {}
    decode: dict[tuple[float, float], float] = {}
    for p in profiles.measured_points(gpu, model, tp):
        whole = p.layers is None
        layers = model.num_layers if whole else p.layers
        if p.phase == "prefill":
            fitted = fitted_time(gpu.fitted.prefill, prefill_terms(model, p.tokens, p.tokens**2, gpu, tp, layers,
                                                                   whole, whole, *link))
            prefill[p.tokens] = (p.ms / 1e3 - (gpu.fitted.per_pass_s if whole else 0.0)) / fitted
        else:
            fitted = fitted_time(gpu.fitted.decode, decode_terms(model, p.batch, p.context_tokens, gpu, tp, layers,
                                                                 whole, *link))
            decode[(p.batch, p.context_tokens)] = (p.ms / 1e3 - (gpu.fitted.per_step_s if whole else 0.0)) / fitted
    return profiles.correction_from(prefill, decode)


# -- the per-stage times both forms give ------------------------------------------------------------
def prefill_stage_time(
    model: ModelSpec,
    tokens: float,
    sq_tokens: float,
    gpu: GpuSpec,
    tp: int,
    layers: int,
    first: bool,
    last: bool,
    intra_bandwidth: float,
    intra_latency: float,
) -> float:
    """Seconds one stage spends on ``tokens`` prompt tokens whose squares sum (or average, for a mean
    prompt) to ``sq_tokens``. Weights are read once per pass: a batch of prompts shares them."""
    if gpu.fitted is not None:
        t = fitted_time(gpu.fitted.prefill, prefill_terms(model, tokens, sq_tokens, gpu, tp, layers, first, last,
                                                          intra_bandwidth, intra_latency))
        return t * measured_correction(gpu, model, tp).prefill(tokens) if profiles.covered(gpu, model, tp) else t
    flops = model.prefill_flops(layers, tokens, sq_tokens, last)
    compute = flops / (tp * gpu.flops_per_s)
    memory = stage_weight_bytes(model, layers, first, last) / (tp * gpu.mem_bytes_per_s)
    comm = layers * 2 * allreduce_time(activation_bytes(model, tokens), tp, intra_bandwidth, intra_latency)
    return np.maximum(compute, memory) + comm


def decode_stage_time(
    model: ModelSpec,
    context_tokens: float,
    gpu: GpuSpec,
    tp: int,
    layers: int,
    batch: float,
    first: bool,
    last: bool,
    intra_bandwidth: float,
    intra_latency: float,
) -> float:
    """Seconds one stage spends on one decode step of ``batch`` requests of mean context ``context_tokens``."""
    if gpu.fitted is not None:
        t = fitted_time(gpu.fitted.decode, decode_terms(model, batch, context_tokens, gpu, tp, layers, last,
                                                        intra_bandwidth, intra_latency))
        if profiles.covered(gpu, model, tp):
            t = t * measured_correction(gpu, model, tp).decode_ratio(batch, context_tokens)
        return t
    heads_dim = model.num_attention_heads * model.head_size
    flops = layers * batch * (2 * model.params_per_layer + 4 * heads_dim * context_tokens)
    if last:
        flops += batch * 2 * model.hidden_size * model.vocab_size
    memory = model.decode_bytes(layers, batch, context_tokens, last) / (tp * gpu.mem_bytes_per_s)
    compute = flops / (tp * gpu.flops_per_s)
    comm = layers * 2 * allreduce_time(activation_bytes(model, batch), tp, intra_bandwidth, intra_latency)
    return np.maximum(memory, compute) + comm


# -- a whole pass: the one function the planner's search and the simulator both call ----------------
@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage as the cost model sees it: ``tp`` GPUs of one type holding ``layers`` layers."""

    gpu: GpuSpec
    tp: int
    layers: int
    first: bool
    last: bool
    intra_bandwidth_bytes_per_s: float  # among the stage's TP ranks
    intra_latency_s: float
    next_bandwidth_bytes_per_s: float = 0.0  # to the next stage (0: last stage, no hop)
    next_latency_s: float = 0.0

    @classmethod
    def replica(cls, gpu: GpuSpec, tp: int, layers: int) -> Stage:
        """A one-stage group of ``tp`` GPUs of one node holding all ``layers``, on the type's own link."""
        return cls(gpu, tp, layers, True, True, gpu.intra_node_bytes_per_s, gpu.intra_node_latency_s)

    def hop_s(self, num_bytes: float) -> float:
        if self.last or self.next_bandwidth_bytes_per_s <= 0:
            return 0.0
        return link_time(num_bytes, self.next_bandwidth_bytes_per_s, self.next_latency_s)


def gpu_pass_overhead_s(gpu: GpuSpec, phase: str) -> float:
    """A GPU type's fixed cost per pass (``phase`` "prefill") or per step ("decode"): the fitted form's
    constant term, or the roofline form's overhead."""
    if gpu.fitted is not None:
        return gpu.fitted.per_pass_s if phase == "prefill" else gpu.fitted.per_step_s
    return getattr(gpu, f"{phase}_overhead_ms") / 1e3


def gpu_request_overhead_s(gpu: GpuSpec) -> float:
    """A GPU type's host cost per request per decode step: the roofline form's ``decode_seq_overhead_ms``
    (the fitted form has its own sequences x layers term)."""
    return 0.0 if gpu.fitted is not None else gpu.decode_seq_overhead_ms / 1e3


def pass_overhead_s(stages: Sequence[Stage], phase: str) -> float:
    """Fixed per-pass cost (scheduling, launches) of a group: its slowest GPU type's, charged once per pass.
    ``phase`` is "prefill" or "decode"."""
    return max(gpu_pass_overhead_s(st.gpu, phase) for st in stages)


def prefill_pass(model: ModelSpec, stages: Sequence[Stage], tokens: float, sq_tokens: float,
                 own_step: bool = False) -> tuple[float, float]:
    """(latency, service) seconds of one prefill pass over ``tokens`` prompt tokens through a pipeline.

    Latency: every stage and hop in turn plus the per-pass overhead. Service: how often the pipeline
    accepts a new pass, its slowest stage or hop (a stage computes while the link carries the previous
    activations); the overhead is host-side work (scheduling, input preparation) that a GPU engine
    overlaps with the previous pass's GPU work, so it adds latency but not service time. Where the
    same cores do both (``host_work_overlaps`` false: a CPU, a lab device) a pass that is a step of
    its own (``own_step``: a prefill worker's) pays its overhead in service time too; one that rides
    on a decode step (colocated) does not, the step's own overhead is charged by ``decode_step``.
    On the lab, service without it predicted a SLOW prefill worker's capacity ~1.6x too high
    (README, "Heterogeneous lab").
    """
    times = [float(prefill_stage_time(model, tokens, sq_tokens, st.gpu, st.tp, st.layers, st.first, st.last,
                                      st.intra_bandwidth_bytes_per_s, st.intra_latency_s)) for st in stages]
    hops = [st.hop_s(activation_bytes(model, tokens)) for st in stages]
    overhead = pass_overhead_s(stages, "prefill")
    serial = overhead if own_step and not all(st.gpu.host_work_overlaps for st in stages) else 0.0
    return sum(times) + sum(hops) + overhead, max(times + hops) + serial


def decode_step(model: ModelSpec, stages: Sequence[Stage], batch: float, context_tokens: float) -> float:
    """Seconds between two tokens of a request when a group decodes ``batch`` requests (TPOT).

    With ``pp`` stages the batch runs as ``m = min(pp, batch)`` micro-batches in flight (vLLM's virtual
    engines): a token waits for the slower of one round trip through the pipeline and ``m`` turns of the
    busiest stage. The per-step overhead is paid once per step, the per-request one once per request.
    """
    m = max(1.0, min(float(len(stages)), float(batch)))
    micro = batch / m
    times = [float(decode_stage_time(model, context_tokens, st.gpu, st.tp, st.layers, micro, st.first, st.last,
                                      st.intra_bandwidth_bytes_per_s, st.intra_latency_s)) for st in stages]
    hops = [st.hop_s(activation_bytes(model, micro)) for st in stages]
    round_trip = sum(times) + sum(hops)
    per_request = max(gpu_request_overhead_s(st.gpu) for st in stages)
    return max(round_trip, m * max(times + hops)) + pass_overhead_s(stages, "decode") + batch * per_request


def kv_alloc_tokens(workload: Workload) -> float:
    """Tokens of KV a running request holds on average (paged: the prompt plus half the output)."""
    return workload.decode_context_mean


def kv_bytes_per_request(model: ModelSpec, workload: Workload) -> float:
    """Bytes of KV cache a prefill hands to decode for an average prompt."""
    return model.kv_bytes_per_token * workload.input_mean


def kv_shard_fraction(model: ModelSpec, layers: int, tp: int) -> float:
    """Share of a request's KV one GPU of a stage holds (KV heads replicate when tp > kv heads:
    ``kv_replication / tp`` of the stage's layers)."""
    return layers / model.num_layers / min(tp, model.num_key_value_heads)
