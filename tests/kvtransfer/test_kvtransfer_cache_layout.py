"""The paged cache's layout: block and head axes, gathering blocks out and scattering them in."""

from __future__ import annotations

import torch

from kvtransfer.cache_layout import CacheLayout
from kvtransfer.reshard import RankShape, send_parts

NUM_BLOCKS = 6


def cpu_cache(kv_heads: int) -> tuple[CacheLayout, torch.Tensor]:
    # vLLM's CPU cache layout: [num_blocks, kv_heads, block_size, 2 * head_size]
    cache = torch.randn(NUM_BLOCKS, kv_heads, 16, 8)
    return CacheLayout({"layer.0": cache}, NUM_BLOCKS, kv_heads), cache


def test_each_decode_rank_gets_its_slice_of_the_gathered_heads():
    layout, cache = cpu_cache(kv_heads=4)
    prefill = RankShape(tp_rank=1, tp_size=2, num_heads=layout.num_heads)
    blocks = layout.gather(cache, [5, 0, 3])
    for target in send_parts(prefill, 4):
        part = layout.heads_of(blocks, target.heads)
        assert part.is_contiguous() and part.shape == (3, 2, 16, 8)
        assert torch.equal(part, cache[[5, 0, 3]][:, target.heads])


def test_a_part_fills_its_slice_of_heads_in_the_named_blocks_and_nothing_else():
    layout, cache = cpu_cache(kv_heads=4)
    before = cache.clone()
    part = torch.randn(2, 2, 16, 8)
    layout.scatter(0, [4, 1], part, slice(2, 4))
    assert torch.equal(cache[[4, 1]][:, 2:4], part)
    assert torch.equal(cache[:, :2], before[:, :2]) and torch.equal(cache[[0, 2, 3, 5]], before[[0, 2, 3, 5]])


def test_head_axis_found_only_when_unambiguous():
    assert CacheLayout({"l": torch.zeros(NUM_BLOCKS, 2, 4, 8)}, NUM_BLOCKS, 2).head_axis == 0
    assert CacheLayout({"l": torch.zeros(2, NUM_BLOCKS, 16, 4, 64)}, NUM_BLOCKS, 4).head_axis == 2  # flash-attn
    assert CacheLayout({"l": torch.zeros(NUM_BLOCKS, 4, 4, 8)}, NUM_BLOCKS, 4).head_axis is None  # heads == block_size
    assert CacheLayout({"l": torch.zeros(NUM_BLOCKS, 4, 4, 8)}, NUM_BLOCKS, 4).num_heads is None
    assert CacheLayout({"l": torch.zeros(2, NUM_BLOCKS, 16, 4, 64)}, NUM_BLOCKS, 4).num_heads == 4


def test_flash_attn_layout_round_trips_blocks():
    cache = torch.randn(2, NUM_BLOCKS, 16, 4, 64)
    layout = CacheLayout({"model.layers.3.self_attn.attn": cache}, NUM_BLOCKS, 4)
    assert (layout.block_dim, layout.block_shape, layout.first_layer) == (1, (2, 16, 4, 64), 3)
    blocks = layout.gather(cache, [2, 5])
    assert torch.equal(blocks, cache[:, [2, 5]].movedim(1, 0))
    target = torch.zeros_like(cache)
    CacheLayout({"model.layers.3.self_attn.attn": target}, NUM_BLOCKS, 4).scatter(0, [1, 0], blocks)
    assert torch.equal(target[:, [1, 0]], cache[:, [2, 5]]) and not target[:, 2:].any()
