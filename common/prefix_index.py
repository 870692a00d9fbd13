"""Which worker holds which prefix-cache blocks: an index fed by KV-cache events.

Each worker's engine reports the blocks it stores and removes (vLLM's
`BlockStored` / `BlockRemoved` / `AllBlocksCleared`, see router.kv_events);
the index keeps, per block hash, the workers holding it. A request's block
hashes (common.block_hash) are chained, so a worker's cached prefix is the
run of the request's hashes it holds, from the first, up to the first miss:
the same walk vLLM's own prefix lookup does.

Memory is bounded twice: removal events keep each worker's set to what its
engine holds, and `max_blocks_per_worker` evicts a worker's oldest entries if
removals were lost (a stale entry only costs a wasted preference; the engine
computes whatever it lacks). A worker that dies, or whose event stream has a
gap, is dropped whole and rebuilt from its next events.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from common.block_hash import BlockKey

DEFAULT_MAX_BLOCKS_PER_WORKER = 1 << 20


@dataclass(slots=True)
class _WorkerBlocks:
    block_size: int | None = None  # learnt from the first stored event
    blocks: OrderedDict[BlockKey, None] = field(default_factory=OrderedDict)  # insertion order = age


@dataclass(slots=True)
class PrefixIndex:
    max_blocks_per_worker: int = DEFAULT_MAX_BLOCKS_PER_WORKER
    _workers: dict[str, _WorkerBlocks] = field(default_factory=dict)
    _holders: dict[BlockKey, set[str]] = field(default_factory=dict)

    def stored(self, worker_id: str, hashes: Iterable[BlockKey], block_size: int) -> None:
        entry = self._workers.setdefault(worker_id, _WorkerBlocks())
        if entry.block_size != block_size:
            if entry.block_size is not None:  # a restarted engine with other settings
                self.drop_worker(worker_id)
                entry = self._workers.setdefault(worker_id, _WorkerBlocks())
            entry.block_size = block_size
        for block_hash in hashes:
            if block_hash in entry.blocks:
                entry.blocks.move_to_end(block_hash)
                continue
            entry.blocks[block_hash] = None
            self._holders.setdefault(block_hash, set()).add(worker_id)
        while len(entry.blocks) > self.max_blocks_per_worker:
            oldest, _ = entry.blocks.popitem(last=False)
            self._forget(worker_id, oldest)

    def removed(self, worker_id: str, hashes: Iterable[BlockKey]) -> None:
        entry = self._workers.get(worker_id)
        if entry is None:
            return
        for block_hash in hashes:
            if block_hash in entry.blocks:
                del entry.blocks[block_hash]
                self._forget(worker_id, block_hash)

    def drop_worker(self, worker_id: str) -> None:
        """Forget everything a worker held (it died, cleared its cache, or we missed events)."""
        entry = self._workers.pop(worker_id, None)
        if entry is None:
            return
        for block_hash in entry.blocks:
            self._forget(worker_id, block_hash)

    def _forget(self, worker_id: str, block_hash: BlockKey) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[block_hash]

    def block_size(self, worker_id: str) -> int | None:
        entry = self._workers.get(worker_id)
        return entry.block_size if entry is not None else None

    def num_blocks(self, worker_id: str) -> int:
        entry = self._workers.get(worker_id)
        return len(entry.blocks) if entry is not None else 0

    def cached_blocks(self, worker_id: str, hashes: Sequence[BlockKey]) -> int:
        """How many of `hashes` (one request's chain) the worker holds, from the first."""
        count = 0
        for block_hash in hashes:
            if worker_id not in self._holders.get(block_hash, ()):
                break
            count += 1
        return count

    def cached_tokens(
        self, worker_ids: Iterable[str], token_ids: Sequence[int],
        hash_chain: Callable[[Sequence[int], int], list[BlockKey]],
    ) -> dict[str, int]:
        """Each worker's cached prefix of `token_ids`, in tokens. `hash_chain(tokens,
        block_size)` gives the chain (memoise it: workers usually share a block size)."""
        result: dict[str, int] = {}
        for worker_id in worker_ids:
            size = self.block_size(worker_id)
            if size is None:
                result[worker_id] = 0
                continue
            result[worker_id] = self.cached_blocks(worker_id, hash_chain(token_ids, size)) * size
        return result
