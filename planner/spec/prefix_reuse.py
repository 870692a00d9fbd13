"""Prefix reuse in a trace: the LRU prefix cache a group keeps, and the reuse profile the planner reads.

It lives with the inputs (planner.spec) because the reuse profile is a
property of the workload, like its length moments, and both the planner's
input parsing and the simulator use the same cache.

The cache: LRU over a trace's hash-id blocks.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.cache_routing import DEFAULT_SHARE_SLACK_REQUESTS, cache_aware_pick

MOONCAKE_BLOCK_TOKENS = 512  # a Mooncake trace's hash_ids name 512-token blocks


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


# -- the reuse profile ------------------------------------------------------
class HashedRequest(Protocol):
    input_tokens: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReuseProfile:
    """How much of a trace's prompt work prefix caches can save.

    ``repeat_fraction``: prompt tokens in leading blocks some earlier request
    already had, over all prompt tokens: one worker with an unbounded cache,
    the most any routing can hit. ``affinity_hit_fraction``: what an ideal
    cache-aware router hits with ``num_workers`` workers of
    ``cache_blocks_per_worker`` blocks each: the router's pick
    (``common.cache_routing.cache_aware_pick``, equal weights, the router's
    share slack, cost = uncached tokens) with every request's blocks cached on
    its worker at once (no queueing, no time), LRU per worker.
    """

    num_requests: int
    prompt_tokens: int
    block_tokens: int
    repeat_fraction: float
    affinity_hit_fraction: float
    num_workers: int
    cache_blocks_per_worker: int

    def to_json(self) -> dict:
        return {"num_requests": self.num_requests, "prompt_tokens": self.prompt_tokens,
                "block_tokens": self.block_tokens, "repeat_fraction": round(self.repeat_fraction, 4),
                "affinity_hit_fraction": round(self.affinity_hit_fraction, 4), "num_workers": self.num_workers,
                "cache_blocks_per_worker": self.cache_blocks_per_worker}


def _hit_fraction(requests: list[HashedRequest], caches: list[PrefixCache], block_tokens: int,
                  share_slack_requests: float) -> tuple[int, int]:
    """(prompt tokens, cached tokens) when `requests` go in order to `caches` by the cache-aware pick."""
    current = {i: 0.0 for i in range(len(caches))}
    weights = dict.fromkeys(current, 1.0)
    prompt = cached = 0
    for r in requests:
        blocks = prompt_blocks(r.hash_ids, r.input_tokens, block_tokens)
        hits = {i: cached_tokens(c.match_blocks(blocks), r.input_tokens, block_tokens) for i, c in enumerate(caches)}
        i = cache_aware_pick(current, weights, {k: r.input_tokens - h for k, h in hits.items()},
                             share_slack_requests) if len(caches) > 1 else 0
        prompt += r.input_tokens
        cached += hits[i]
        caches[i].insert(blocks)
    return prompt, cached


def reuse_profile(requests: Iterable[HashedRequest], num_workers: int, cache_tokens_per_worker: int,
                  block_tokens: int = MOONCAKE_BLOCK_TOKENS,
                  share_slack_requests: float = DEFAULT_SHARE_SLACK_REQUESTS) -> ReuseProfile:
    """The trace's reuse profile (`ReuseProfile`), requests in arrival order. Raises ValueError when no
    request has hash ids (the trace says nothing about reuse) or an argument is out of range."""
    reqs = [r for r in requests if r.input_tokens > 0]
    if not any(r.hash_ids for r in reqs):
        raise ValueError("the trace has no hash_ids, so its prefix reuse is unknown; use a Mooncake-format trace "
                         "or give prefix_hit_fraction as a number")
    if num_workers < 1 or cache_tokens_per_worker < block_tokens or block_tokens < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 1 and cache_tokens_per_worker="
                         f"{cache_tokens_per_worker} at least one block of block_tokens={block_tokens}")
    cache_blocks = cache_tokens_per_worker // block_tokens
    prompt, repeat = _hit_fraction(reqs, [PrefixCache(1 << 62)], block_tokens, share_slack_requests)
    _, affinity = _hit_fraction(reqs, [PrefixCache(cache_blocks) for _ in range(num_workers)], block_tokens,
                                share_slack_requests)
    return ReuseProfile(len(reqs), prompt, block_tokens, repeat / prompt, affinity / prompt, num_workers,
                        cache_blocks)
