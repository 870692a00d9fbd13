"""A group's prefix cache in the simulation: LRU over a trace's hash-id blocks.

A Mooncake-style trace names each `block_tokens`-token block of a prompt by a
hash id; equal ids mean equal content *and* equal everything before it (the
ids chain like vLLM's block hashes). A group holds a request's cached prefix
when it holds the run of the request's ids from the first one: the engine
(vLLM's automatic prefix caching) reuses blocks only from the start of the
prompt, so a hit after a miss does not count.

Capacity is in blocks: the group's KV capacity in tokens (what the planner's
memory model leaves after the weights) over `block_tokens`. The simulation
treats the whole KV cache as prefix cache (vLLM keeps finished requests'
blocks until it needs the memory, and a running request's blocks are
shareable too), so it neither reserves room for running requests nor evicts
a block a running request still uses: a simplification that errs toward
more hits when the cache is full of running requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def prompt_blocks(hash_ids: Sequence[int], input_tokens: int, block_tokens: int) -> Sequence[int]:
    """The ids of the blocks a (possibly clipped) prompt of `input_tokens` covers."""
    return hash_ids[: -(-input_tokens // block_tokens)]


def cached_tokens(num_blocks: int, input_tokens: int, block_tokens: int) -> int:
    """Prompt tokens a hit of `num_blocks` leading blocks saves. At least one token is always computed
    (vLLM recomputes the last token of a full hit to get its logits)."""
    return max(0, min(num_blocks * block_tokens, input_tokens - 1))


class PrefixCache:
    """LRU set of block ids with a capacity in blocks (capacity 0 caches nothing)."""

    __slots__ = ("capacity_blocks", "_blocks")

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks={capacity_blocks} must be >= 0")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._blocks

    def match_blocks(self, blocks: Sequence[int]) -> int:
        """How many of `blocks`, from the first, the cache holds (a lookup: recency unchanged)."""
        n = 0
        for block_id in blocks:
            if block_id not in self._blocks:
                break
            n += 1
        return n

    def insert(self, blocks: Sequence[int]) -> None:
        """Hold `blocks` as the most recently used, evicting the least recently used past capacity.

        Blocks are touched tail first, so a prompt's head is the most recent and is evicted last
        (vLLM frees a request's blocks in reverse order for the same reason: a lost head block
        makes the rest of the prefix unreachable).
        """
        if self.capacity_blocks == 0:
            return
        cache = self._blocks
        for block_id in reversed(blocks):
            if block_id in cache:
                cache.move_to_end(block_id)
            else:
                cache[block_id] = None
        while len(cache) > self.capacity_blocks:
            cache.popitem(last=False)
