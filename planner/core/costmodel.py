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

``mfu``, ``mbu`` and the per-request overheads come from the GPU catalog and
can be fitted to measurements (``planner.spec.calibration``).
"""

from __future__ import annotations

import numpy as np

from planner.spec.catalog import GpuSpec
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


def prefill_stage_time(
    model: ModelSpec,
    workload: Workload,
    gpu: GpuSpec,
    tp: int,
    layers: int,
    first: bool,
    last: bool,
    intra_bandwidth: float,
    intra_latency: float,
) -> float:
    """Seconds one stage spends on one average prompt (weights read once per prompt: no batching credit)."""
    s = workload.input_mean
    flops = model.prefill_flops(layers, s, workload.input_sq_mean, last)
    compute = flops / (tp * gpu.flops_per_s)
    memory = stage_weight_bytes(model, layers, first, last) / (tp * gpu.mem_bytes_per_s)
    comm = layers * 2 * allreduce_time(activation_bytes(model, s), tp, intra_bandwidth, intra_latency)
    return np.maximum(compute, memory) + comm


def decode_stage_time(
    model: ModelSpec,
    workload: Workload,
    gpu: GpuSpec,
    tp: int,
    layers: int,
    batch: float,
    first: bool,
    last: bool,
    intra_bandwidth: float,
    intra_latency: float,
) -> float:
    """Seconds one stage spends on one decode step of ``batch`` requests."""
    ctx = workload.decode_context_mean
    heads_dim = model.num_attention_heads * model.head_size
    flops = layers * batch * (2 * model.params_per_layer + 4 * heads_dim * ctx)
    if last:
        flops += batch * 2 * model.hidden_size * model.vocab_size
    memory = model.decode_bytes(layers, batch, ctx, last) / (tp * gpu.mem_bytes_per_s)
    compute = flops / (tp * gpu.flops_per_s)
    comm = layers * 2 * allreduce_time(activation_bytes(model, batch), tp, intra_bandwidth, intra_latency)
    return np.maximum(memory, compute) + comm


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


def mdl_queue_capacity(service_s: float, latency_s: float, budget_s: float) -> float:
    """Highest arrival rate (req/s) at which latency plus M/D/1 queueing stays within ``budget_s``.

    A pipeline that accepts one request every ``service_s`` seconds and finishes
    it ``latency_s`` after it starts waits ``rho * service / (2 (1 - rho))`` on
    average at utilisation ``rho`` (Pollaczek-Khinchine, deterministic service;
    DistServe models prefill the same way). Solving ``latency + wait <= budget``
    for rho gives ``rho = 2 slack / (service + 2 slack)``.
    """
    slack = budget_s - latency_s
    if slack <= 0 or service_s <= 0:
        return 0.0
    rho = 2 * slack / (service_s + 2 * slack)
    return rho / service_s
