"""TP/PP resharding arithmetic: which parts of a request's KV one rank sends or loads.

Pure: integers, tuples and slices in, parts out; no tensors, no sockets, no
vLLM (as vLLM keeps its TP mapping apart from its connectors), so every
layout pair is unit-tested without an engine.

Every rank of an engine (pipeline stage x TP rank) holds its stage's layers
and its TP rank's slice of the KV heads, and moves only those. A transfer
therefore reaches a decode rank in *parts*, one from each prefill rank that
holds some of its layers and heads:

- heads, same TP on both sides: prefill rank r sends all its heads to decode rank r;
- decode TP = k x prefill TP: prefill rank r splits its heads k ways and
  sends slice m to decode rank r*k + m (each decode rank gets one whole part);
- prefill TP = k x decode TP: prefill rank r sends its whole shard to decode
  rank r // k as part `#h<r % k>`; that rank fills its heads from k parts;
- anything else goes rank to rank as is; the decode rank refuses a block shape
  that does not fit its cache (`fits_block_shape`) and decode recomputes;
- layers: each prefill stage sends each decode stage the layers both hold,
  as part `#p<prefill stage>` when prefill is pipelined.

Layer partitions are given as layers per stage (the form of
VLLM_PP_LAYER_PARTITION and of a plan group's layer_partition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Part:
    """One decode rank's share of a transfer: some layers, some (or all) KV heads.

    Prefill sends it as `transfer_id + suffix` to decode rank `rank`; decode
    assembles its cache from the parts that cover its layers and heads.
    """

    rank: int  # decode rank (its pipeline stage x its TP size + its TP rank)
    suffix: str  # "" | "#p<prefill stage>" + "" | "#h<head part>"
    heads: slice | None  # prefill: slice of our heads sent; decode: slice of our heads filled; None: all
    first_layer: int
    num_layers: int

    def holds(self, layer: int) -> bool:
        return self.first_layer <= layer < self.first_layer + self.num_layers


@dataclass(frozen=True, slots=True)
class RankShape:
    """What one worker rank holds of the model's KV cache."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    first_layer: int = 0  # the model's number of this rank's first layer
    num_layers: int = 1
    total_layers: int = 1  # the model's layer count (all stages)
    # KV heads in this rank's cache; None where the cache's head axis cannot
    # be told apart (then heads are never split or merged).
    num_heads: int | None = None

    @property
    def worker_index(self) -> int:
        """vLLM's rank numbering (stage x TP size + TP rank): our socket and stats file."""
        return self.pp_rank * self.tp_size + self.tp_rank


def stage_ranges(partition: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each pipeline stage's layers, from layers per stage."""
    ranges, start = [], 0
    for count in partition:
        ranges.append((start, start + count))
        start += count
    return ranges


def layer_partition(value: Any, total_layers: int | None = None, name: str = "layer partition") -> tuple[int, ...]:
    """Layers per pipeline stage, checked: positive ints (summing to total_layers when given)."""
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)
    ):
        raise ValueError(f"{name}={value!r} must be a non-empty list of layers per pipeline stage, e.g. [16, 16]")
    if total_layers is not None and sum(value) != total_layers:
        raise ValueError(f"{name}={list(value)} covers {sum(value)} layers; this model has {total_layers}")
    return tuple(value)


def shared_layers(layers_per_stage: Sequence[int], first_layer: int, num_layers: int) -> list[tuple[int, int, int]]:
    """(stage, first layer, layer count) of each stage of the other engine
    holding some of our layers [first_layer, first_layer + num_layers)."""
    ours = (first_layer, first_layer + num_layers)
    shared = []
    for stage, (lo, hi) in enumerate(stage_ranges(layers_per_stage)):
        first, stop = max(lo, ours[0]), min(hi, ours[1])
        if first < stop:
            shared.append((stage, first, stop - first))
    return shared


def head_slices(num_heads: int | None, ways: int) -> list[slice] | None:
    """num_heads KV heads split `ways` ways, or None if they cannot be."""
    if num_heads is None or num_heads % ways:
        return None
    per = num_heads // ways
    return [slice(m * per, (m + 1) * per) for m in range(ways)]


def head_targets(rank: RankShape, decode_tp: int) -> list[tuple[int, slice | None, str]]:
    """(decode TP rank, slice of our heads or None for all, part suffix) per
    destination of prefill rank `rank` (the module docstring's heads rules)."""
    tp_rank, tp_size = rank.tp_rank, rank.tp_size
    if decode_tp > tp_size and decode_tp % tp_size == 0:
        slices = head_slices(rank.num_heads, decode_tp // tp_size)
        if slices is not None:
            ways = len(slices)
            return [(tp_rank * ways + m, heads, "") for m, heads in enumerate(slices)]
    if decode_tp < tp_size and tp_size % decode_tp == 0 and rank.num_heads is not None:
        ways = tp_size // decode_tp
        return [(tp_rank // ways, None, f"#h{tp_rank % ways}")]
    return [(tp_rank, None, "")]


def send_parts(rank: RankShape, decode_tp: int, decode_layers: tuple[int, ...] | None = None) -> list[Part]:
    """Every part prefill rank `rank` sends: to each decode stage holding some
    of our layers (decode_layers: its layers per stage; None: one stage), for
    each of its TP ranks holding some of our heads. Parts of a pipelined
    prefill are suffixed `#p<our stage>` so a decode rank can tell them apart."""
    stage = f"#p{rank.pp_rank}" if rank.pp_size > 1 else ""
    return [
        Part(q * decode_tp + t, stage + suffix, heads, first, count)
        for q, first, count in shared_layers(decode_layers or (rank.total_layers,), rank.first_layer, rank.num_layers)
        for t, heads, suffix in head_targets(rank, decode_tp)
    ]


def load_parts(rank: RankShape, prefill_tp: int, prefill_layers: tuple[int, ...] | None = None) -> list[Part]:
    """Every part decode rank `rank` loads (the mirror of `send_parts`): from
    each prefill stage holding some of our layers, each prefill rank holding
    some of our heads."""
    heads: list[tuple[str, slice | None]] = [("", None)]
    if prefill_tp > rank.tp_size and prefill_tp % rank.tp_size == 0:
        slices = head_slices(rank.num_heads, prefill_tp // rank.tp_size)
        if slices is not None:
            heads = [(f"#h{m}", part) for m, part in enumerate(slices)]
    stages = prefill_layers or (rank.total_layers,)
    return [
        Part(rank.worker_index, (f"#p{s}" if len(stages) > 1 else "") + suffix, part, first, count)
        for s, first, count in shared_layers(stages, rank.first_layer, rank.num_layers)
        for suffix, part in heads
    ]


def fits_block_shape(block_shape: tuple[int, ...], ours: tuple[int, ...], head_axis: int | None) -> bool:
    """A part's block shape fits our cache's: the same, or (one part from a
    prefill engine with more TP) ours with a whole fraction of the KV heads."""
    if block_shape == ours:
        return True
    if head_axis is None or len(block_shape) != len(ours):
        return False
    others_equal = all(a == b for i, (a, b) in enumerate(zip(block_shape, ours)) if i != head_axis)
    return others_equal and 0 < block_shape[head_axis] < ours[head_axis] and ours[head_axis] % block_shape[head_axis] == 0
