"""Which decode ranks a prefill rank's KV goes to, and the slice of heads each gets:
the pure arithmetic of kvtransfer.reshard, no tensors."""

from __future__ import annotations

import pytest

from kvtransfer.handoff import prefill_params
from kvtransfer.reshard import (
    RankShape,
    fits_block_shape,
    head_slices,
    layer_partition,
    load_parts,
    send_parts,
    shared_layers,
    stage_ranges,
)


def rank(tp_rank: int, tp_size: int, kv_heads: int | None) -> RankShape:
    """One rank of a one-layer model holding kv_heads heads."""
    return RankShape(tp_rank=tp_rank, tp_size=tp_size, first_layer=0, num_layers=1, total_layers=1, num_heads=kv_heads)


def heads_of(parts) -> list[tuple]:
    """(decode rank, slice of heads, suffix) of each part; these tests have one layer."""
    assert all((p.first_layer, p.num_layers) == (0, 1) for p in parts)
    return [(p.rank, p.heads, p.suffix) for p in parts]


def test_same_tp_goes_to_the_twin_rank_whole():
    assert heads_of(send_parts(rank(1, 2, 2), 2)) == [(1, None, "")]


def test_decode_with_k_times_the_tp_gets_one_slice_of_heads_per_rank():
    assert heads_of(send_parts(rank(1, 2, 4), 4)) == [(2, slice(0, 2), ""), (3, slice(2, 4), "")]


@pytest.mark.parametrize("tp_size,kv_heads,decode_tp", [(2, 2, 3), (1, 2, 4), (1, 3, 2)])
def test_layouts_that_cannot_be_resharded_go_to_the_twin_rank_as_is(tp_size, kv_heads, decode_tp):
    """Decode refuses their block shape before buffering and recomputes."""
    assert heads_of(send_parts(rank(0, tp_size, kv_heads), decode_tp)) == [(0, None, "")]


def test_heads_that_cannot_be_told_apart_are_never_split_or_merged():
    assert heads_of(send_parts(rank(1, 2, None), 4)) == [(1, None, "")]
    assert heads_of(send_parts(rank(3, 4, None), 2)) == [(3, None, "")]
    assert heads_of(load_parts(rank(0, 1, None), 2)) == [(0, None, "")]


def test_prefill_with_k_times_the_tp_sends_its_whole_shard_as_one_part():
    for r in range(4):
        assert heads_of(send_parts(rank(r, 4, 1), 2)) == [(r // 2, None, f"#h{r % 2}")]


def test_decode_assembles_its_heads_from_the_parts():
    decode = rank(0, 1, 4)
    assert [(p.suffix, p.heads) for p in load_parts(decode, prefill_tp=2)] == [("#h0", slice(0, 2)), ("#h1", slice(2, 4))]
    assert [(p.suffix, p.heads) for p in load_parts(decode, prefill_tp=1)] == [("", None)]


def test_decode_accepts_a_part_with_fewer_heads_only():
    ours, axis = (4, 16, 8), 0
    assert fits_block_shape((4, 16, 8), ours, axis) and fits_block_shape((2, 16, 8), ours, axis)
    assert fits_block_shape((1, 16, 8), ours, axis)
    assert not fits_block_shape((3, 16, 8), ours, axis) and not fits_block_shape((8, 16, 8), ours, axis)
    assert not fits_block_shape((2, 8, 8), ours, axis) and not fits_block_shape((2, 16), ours, axis)
    assert not fits_block_shape((2, 16, 8), ours, None)  # no head axis: only the very same shape


def test_pipeline_parts_carry_each_stages_shared_layers():
    # Prefill in stages of 1 + 3 layers, decode in 3 + 1: prefill stage 1
    # (layers 1-3) sends layers 1-2 to decode stage 0 and layer 3 to stage 1.
    stage1 = RankShape(pp_rank=1, pp_size=2, first_layer=1, num_layers=3, total_layers=4, num_heads=4)
    assert [(p.rank, p.suffix, p.first_layer, p.num_layers) for p in send_parts(stage1, 1, (3, 1))] == [
        (0, "#p1", 1, 2), (1, "#p1", 3, 1)]
    # Decode stage 0 (layers 0-2) loads layer 0 from prefill stage 0 and layers 1-2 from stage 1.
    decode0 = RankShape(pp_rank=0, pp_size=2, first_layer=0, num_layers=3, total_layers=4, num_heads=4)
    assert [(p.rank, p.suffix, p.first_layer, p.num_layers) for p in load_parts(decode0, 1, (1, 3))] == [
        (0, "#p0", 0, 1), (0, "#p1", 1, 2)]
    # TP x PP: decode rank numbers are stage x TP + TP rank.
    decode1 = RankShape(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, first_layer=2, num_layers=2, total_layers=4, num_heads=2)
    assert decode1.worker_index == 3
    assert [(p.rank, p.suffix, p.heads) for p in load_parts(decode1, 4, (4,))] == [(3, "#h0", slice(0, 1)), (3, "#h1", slice(1, 2))]
    assert send_parts(stage1, 1, (3, 1))[0].holds(2) and not send_parts(stage1, 1, (3, 1))[0].holds(3)


def test_stage_arithmetic():
    assert stage_ranges([1, 3]) == [(0, 1), (1, 4)]
    assert shared_layers((1, 3), 1, 3) == [(1, 1, 3)]
    assert shared_layers((2, 2), 1, 2) == [(0, 1, 1), (1, 2, 1)]
    assert head_slices(4, 2) == [slice(0, 2), slice(2, 4)] and head_slices(3, 2) is None and head_slices(None, 2) is None
    assert layer_partition([2, 2], 4) == (2, 2)
    for bad in ([2, 3], [4, 0], "2,2", [2.0, 2], [], [True, 3]):
        with pytest.raises(ValueError, match="layers"):
            layer_partition(bad, 4)


def test_prefill_params_refuse_a_bad_decode_tp():
    with pytest.raises(ValueError, match="decode_tp"):
        prefill_params("tcp://127.0.0.1:5000", decode_tp=0)
