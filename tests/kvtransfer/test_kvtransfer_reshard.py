"""Which decode ranks a prefill rank's KV goes to, and the slice of heads each gets."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.handoff import ConnectorOptions, prefill_params
from kvtransfer.worker_side import CacheLayout, WorkerSide

NUM_BLOCKS = 6


def worker(rank: int, tp_size: int, kv_heads: int) -> tuple[WorkerSide, torch.Tensor]:
    # vLLM's CPU cache layout: [num_blocks, kv_heads, block_size, 2 * head_size]
    cache = torch.randn(NUM_BLOCKS, kv_heads, 16, 8)
    side = WorkerSide(ConnectorOptions(), is_producer=False, is_consumer=False, num_blocks=NUM_BLOCKS,
                      rank=rank, tp_size=tp_size, kv_heads=kv_heads)
    side.layout = CacheLayout({"layer.0": cache}, NUM_BLOCKS, kv_heads)
    side.total_layers = 1
    return side, cache


def heads_of(parts) -> list[tuple]:
    """(decode rank, slice of heads, suffix) of each part; these tests have one layer."""
    assert all((p.first_layer, p.num_layers) == (0, 1) for p in parts)
    return [(p.rank, p.heads, p.suffix) for p in parts]


def test_same_tp_goes_to_the_twin_rank_whole():
    side, _ = worker(rank=1, tp_size=2, kv_heads=2)
    assert heads_of(side._targets(2)) == [(1, None, "")]


def test_decode_with_k_times_the_tp_gets_one_slice_of_heads_per_rank():
    side, cache = worker(rank=1, tp_size=2, kv_heads=4)
    assert heads_of(side._targets(4)) == [(2, slice(0, 2), ""), (3, slice(2, 4), "")]
    blocks = side.layout.gather(cache, [5, 0, 3])
    for target in side._targets(4):
        part = side._heads(blocks, target.heads)
        assert part.is_contiguous() and part.shape == (3, 2, 16, 8)
        assert torch.equal(part, cache[[5, 0, 3]][:, target.heads])


@pytest.mark.parametrize("tp_size,kv_heads,decode_tp", [(2, 2, 3), (1, 2, 4), (1, 3, 2)])
def test_layouts_that_cannot_be_resharded_go_to_the_twin_rank_as_is(tp_size, kv_heads, decode_tp):
    """Decode refuses their block shape before buffering and recomputes."""
    side, _ = worker(rank=0, tp_size=tp_size, kv_heads=kv_heads)
    assert heads_of(side._targets(decode_tp)) == [(0, None, "")]


def test_prefill_with_k_times_the_tp_sends_its_whole_shard_as_one_part():
    for rank in range(4):
        side, _ = worker(rank=rank, tp_size=4, kv_heads=1)
        assert heads_of(side._targets(2)) == [(rank // 2, None, f"#h{rank % 2}")]


def test_decode_assembles_its_heads_from_the_parts():
    from kvtransfer.metadata import LoadSpec

    side, cache = worker(rank=0, tp_size=1, kv_heads=4)
    spec = LoadSpec("r", "t", "h", 10, 0, [1, 2], prefill_tp=2)
    assert [(p.suffix, p.heads) for p in side._sources(spec)] == [("#h0", slice(0, 2)), ("#h1", slice(2, 4))]
    assert [(p.suffix, p.heads) for p in side._sources(LoadSpec("r", "t", "h", 10, 0, [1, 2]))] == [("", None)]
    # Each part fills its slice of heads in the named blocks and nothing else.
    before = cache.clone()
    part = torch.randn(2, 2, 16, 8)
    side.layout.scatter(0, [4, 1], part, slice(2, 4))
    assert torch.equal(cache[[4, 1]][:, 2:4], part)
    assert torch.equal(cache[:, :2], before[:, :2]) and torch.equal(cache[[0, 2, 3, 5]], before[[0, 2, 3, 5]])


def test_decode_accepts_a_part_with_fewer_heads_only():
    side, _ = worker(rank=0, tp_size=1, kv_heads=4)
    assert side._fits((4, 16, 8)) and side._fits((2, 16, 8)) and side._fits((1, 16, 8))
    assert not side._fits((3, 16, 8)) and not side._fits((8, 16, 8)) and not side._fits((2, 8, 8)) and not side._fits((2, 16))


def test_head_axis_found_only_when_unambiguous():
    assert CacheLayout({"l": torch.zeros(NUM_BLOCKS, 2, 4, 8)}, NUM_BLOCKS, 2).head_axis == 0
    assert CacheLayout({"l": torch.zeros(2, NUM_BLOCKS, 16, 4, 64)}, NUM_BLOCKS, 4).head_axis == 2  # flash-attn
    assert CacheLayout({"l": torch.zeros(NUM_BLOCKS, 4, 4, 8)}, NUM_BLOCKS, 4).head_axis is None  # heads == block_size


def test_prefill_params_refuse_a_bad_decode_tp():
    with pytest.raises(ValueError, match="decode_tp"):
        prefill_params("tcp://127.0.0.1:5000", decode_tp=0)
