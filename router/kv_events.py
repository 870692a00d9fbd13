"""The router's subscription to its workers' KV-cache events.

Each worker's engine publishes vLLM's KV events (vllm/distributed/kv_events.py:
a PUB socket sending [topic, 8-byte big-endian sequence number, msgpack
`KVEventBatch`], each event a map tagged "BlockStored", "BlockRemoved" or
"AllBlocksCleared"). One SUB socket per worker feeds the prefix index
(common.prefix_index).

The index stays sound when events go missing: a sequence gap, a sequence
that restarts (the engine restarted), a batch we cannot decode, or the worker
leaving rotation drops the worker's entries, and its next events rebuild them.
A missing entry only costs a cache hit; a stale one a wasted preference: the
engine always computes what it lacks, so routing never depends on the index
for correctness.

The event types are mirrored here (the fields the index reads; msgspec skips
the rest) rather than imported, so the router process does not import vLLM;
a test decodes a real engine's events with them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from common.block_hash import block_key
from common.prefix_index import PrefixIndex
from common.sockets import make_socket

log = logging.getLogger(__name__)

BlockHash = bytes | int  # vLLM sends bytes; VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 sends ints


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[BlockHash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def apply_batch(index: PrefixIndex, worker_id: str, batch: KVEventBatch) -> None:
    for event in batch.events:
        if isinstance(event, BlockStored):
            # A block the engine offloads to another tier (CPU, storage) is not a hit the
            # engine's own prefix lookup finds; only the primary cache counts.
            if event.medium in (None, "GPU"):
                index.stored(worker_id, [block_key(h) for h in event.block_hashes], event.block_size)
        elif isinstance(event, BlockRemoved):
            if event.medium in (None, "GPU"):
                index.removed(worker_id, [block_key(h) for h in event.block_hashes])
        else:
            index.drop_worker(worker_id)


@dataclass(slots=True)
class EventStats:
    batches: int = 0
    events: int = 0
    resets: dict[str, int] = field(default_factory=dict)  # reason -> count (gaps, restarts, undecodable)


@dataclass(slots=True)
class WorkerEventFeed:
    """Keeps `index` current from one worker's event stream until cancelled."""

    worker_id: str
    endpoint: str
    index: PrefixIndex
    is_healthy: Callable[[], bool]
    stats: EventStats
    poll_interval_s: float = 0.5
    _next_seq: int | None = None
    _was_healthy: bool = False

    def _reset(self, reason: str) -> None:
        self.index.drop_worker(self.worker_id)
        self.stats.resets[reason] = self.stats.resets.get(reason, 0) + 1

    def handle(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._reset("malformed")
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        if self._next_seq is not None and seq != self._next_seq:
            # A gap loses what we missed; a smaller number is a restarted engine.
            self._reset("gap" if seq > self._next_seq else "restart")
        self._next_seq = seq + 1
        try:
            batch = _decoder.decode(frames[2])
        except msgspec.DecodeError as exc:
            log.warning("worker %s: undecodable KV event batch (%s); its prefix index entries are dropped",
                        self.worker_id, exc)
            self._reset("undecodable")
            return
        self.stats.batches += 1
        self.stats.events += len(batch.events)
        apply_batch(self.index, self.worker_id, batch)

    def check_health(self) -> None:
        healthy = self.is_healthy()
        if self._was_healthy and not healthy:
            self._reset("worker_unhealthy")  # its cache may be gone with it
        self._was_healthy = healthy

    async def run(self, ctx: zmq.asyncio.Context) -> None:
        sock = make_socket(ctx, zmq.SUB, self.endpoint, bind=False, hwm_messages=100_000)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            while True:
                if await sock.poll(int(self.poll_interval_s * 1000)):
                    self.handle(await sock.recv_multipart())
                self.check_health()
        finally:
            sock.close(linger=0)
