"""Decode's load path: a received transfer into the request's blocks of this rank's cache.

A load named by the scheduler waits until the receiver holds every part of
the transfer this rank needs (kvtransfer.reshard), complete and verified;
checks that each is for this prompt and holds the layers the handoff named;
and copies it into the request's blocks (the one copy on this side). It is
reported finished; on failure or timeout it is also reported failed and
vLLM recomputes the prompt (kv_load_failure_policy="recompute").

A synchronous load (the KV had arrived when the scheduler admitted the
request, kvtransfer.arrivals) is settled inside `start`, before the step's
forward pass; one that finds nothing reports its blocks invalid instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kvtransfer import codec
from kvtransfer.assembler import Claim, Transfer
from kvtransfer.cache_layout import CacheLayout
from kvtransfer.options import ConnectorOptions
from kvtransfer.metadata import ForgetSpec, LoadSpec
from kvtransfer.protocol import Begin
from kvtransfer.receiver import KVReceiver
from kvtransfer.reshard import Part, RankShape, fits_block_shape, load_parts
from kvtransfer.stats import Stats

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _PendingLoad:
    spec: LoadSpec
    deadline_s: float


def begin_mismatch(begin: Begin, layout: CacheLayout) -> str | None:
    """Why this cache cannot hold the transfer `begin` opens, or None: the
    receiver refuses such a Begin before buffering anything."""
    last = layout.first_layer + layout.num_layers
    if begin.first_layer < layout.first_layer or begin.first_layer + begin.num_layers > last:
        return (
            f"layers {begin.first_layer}..{begin.first_layer + begin.num_layers - 1} are not all in this worker's "
            f"cache (layers {layout.first_layer}..{last - 1}; different model or pipeline split?)"
        )
    if not fits_block_shape(tuple(begin.block_shape), layout.block_shape, layout.head_axis) or begin.dtype != layout.dtype:
        return (
            f"block {begin.block_shape}/{begin.dtype} differs from this cache's "
            f"{layout.block_shape}/{layout.dtype} (different model, block_size, dtype or tensor_parallel_size?)"
        )
    return None


class LoadPath:
    # A claimed transfer stays loadable for this many more polls (engine steps),
    # for parallel-sampling siblings admitted a step later; then it is released.
    RECLAIM_POLLS = 3

    def __init__(
        self, options: ConnectorOptions, layout: CacheLayout, rank: RankShape, receiver: KVReceiver | None, stats: Stats
    ) -> None:
        self.options = options
        self.layout = layout
        self.rank = rank
        self.receiver = receiver  # None: not a consumer, every load fails
        self.stats = stats
        self._pending: dict[str, _PendingLoad] = {}
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self._claimed: dict[str, int] = {}  # transfer_id -> polls left before its bytes are released
        # Blocks of synchronous loads that found no KV: vLLM recomputes them (get_block_ids_with_load_errors).
        self._invalid_blocks: set[int] = set()

    def parts(self, spec: LoadSpec) -> list[Part]:
        return load_parts(self.rank, spec.prefill_tp, spec.prefill_layers)

    def forget(self, forgets: list[ForgetSpec]) -> None:
        """Drop every part this rank holds of transfers whose handoff was refused."""
        if self.receiver is None:
            return
        for spec in forgets:
            for part in load_parts(self.rank, spec.prefill_tp, spec.prefill_layers):
                self.receiver.forget(spec.transfer_id + part.suffix, "its handoff was refused")

    def start(self, loads: list[LoadSpec]) -> None:
        now = time.monotonic()
        for spec in loads:
            self._pending[spec.request_id] = _PendingLoad(spec, now + self.options.load_timeout_s)
        self.poll()
        for spec in loads:
            if spec.sync:
                self._settle_sync_load(spec)

    def _settle_sync_load(self, spec: LoadSpec) -> None:
        """A synchronous load is done within this step, before the forward pass:
        the scheduler chose it because the KV had arrived (kvtransfer.arrivals).
        vLLM hears of it only if it failed, through its blocks, never as a
        finished receive (that is for requests parked waiting for their KV)."""
        request_id = spec.request_id
        loaded = request_id in self._finished and request_id not in self._failed
        self._finished.discard(request_id)
        self._failed.discard(request_id)
        if request_id in self._pending:  # the mark was stale: nothing to load now
            del self._pending[request_id]
            self.stats.add("transfers_loaded_failed")
            logger.warning("kvtransfer: request %s will recompute its prompt: transfer %s was not there to load", request_id, spec.transfer_id)
        if loaded:
            self.stats.add("transfers_loaded_sync")
        else:
            self._invalid_blocks.update(spec.block_ids)

    def take_invalid_blocks(self) -> set[int]:
        """Blocks that synchronous loads could not fill since the last call."""
        blocks, self._invalid_blocks = self._invalid_blocks, set()
        return blocks

    def _release_claimed(self) -> None:
        for transfer_id in list(self._claimed):
            self._claimed[transfer_id] -= 1
            if self._claimed[transfer_id] <= 0:
                del self._claimed[transfer_id]
                if self.receiver is not None:
                    self.receiver.release(transfer_id)

    def poll(self) -> None:
        """Load every pending request whose transfer is complete; fail those
        whose transfer failed or timed out."""
        self._release_claimed()
        if not self._pending:
            return
        if self.receiver is None:
            for request_id in list(self._pending):
                self._fail(request_id, "this engine has no receiver (kv_role is not a consumer)")
            return
        now = time.monotonic()
        by_transfer: dict[str, list[_PendingLoad]] = {}
        for pending in self._pending.values():
            by_transfer.setdefault(pending.spec.transfer_id, []).append(pending)
        # Requests sharing a transfer (parallel sampling, n > 1) load from one claim.
        for transfer_id, loads in by_transfer.items():
            self._poll_transfer(transfer_id, loads, now)

    def _poll_transfer(self, transfer_id: str, loads: list[_PendingLoad], now: float) -> None:
        assert self.receiver is not None
        parts = [(part, self.receiver.claim(transfer_id + part.suffix)) for part in self.parts(loads[0].spec)]
        for part, claim in parts:
            if claim.state == "complete":
                self._claimed[transfer_id + part.suffix] = self.RECLAIM_POLLS
        failed = next((claim for _, claim in parts if claim.state == "failed"), None)
        if failed is None and any(claim.state == "pending" for _, claim in parts):
            self._wait(transfer_id, loads, parts, now)
        elif failed is not None:
            self._forget_parts(transfer_id, parts, "another part of this transfer failed")
            for pending in loads:
                self._fail(pending.spec.request_id, f"transfer {transfer_id} failed: {failed.error}")
        else:
            for pending in loads:
                self._load(pending.spec, parts)

    def _wait(self, transfer_id: str, loads: list[_PendingLoad], parts: list[tuple[Part, Claim]], now: float) -> None:
        """Some part is still on its way: fail the loads past their deadline;
        once no request waits for the transfer, its parts are dropped."""
        for pending in loads:
            if now >= pending.deadline_s:
                self.stats.add("load_timeouts")
                self._fail(pending.spec.request_id, f"KV for transfer {transfer_id} did not arrive within {self.options.load_timeout_s}s")
        if not any(p.spec.request_id in self._pending for p in loads):
            self._forget_parts(transfer_id, parts, "decode stopped waiting")

    def _load(self, spec: LoadSpec, parts: list[tuple[Part, Claim]]) -> None:
        for part, claim in parts:
            assert claim.transfer is not None
            error = self._write(spec, part, claim.transfer)
            if error:
                self._fail(spec.request_id, error)
                return
        del self._pending[spec.request_id]
        self._finished.add(spec.request_id)
        self.stats.add("transfers_loaded_ok")

    def _forget_parts(self, transfer_id: str, parts: list[tuple[Part, Claim]], reason: str) -> None:
        assert self.receiver is not None
        for part, claim in parts:
            if claim.state == "pending":
                self.receiver.forget(transfer_id + part.suffix, reason)

    def _write(self, spec: LoadSpec, part: Part, transfer: Transfer) -> str | None:
        begin = transfer.begin
        if begin.prompt_hash != spec.prompt_hash or begin.num_tokens != spec.num_tokens:
            return f"transfer {spec.transfer_id} carries another prompt ({begin.num_tokens} tokens, hash {begin.prompt_hash})"
        if (begin.first_layer, begin.num_layers) != (part.first_layer, part.num_layers):
            return (
                f"part {spec.transfer_id}{part.suffix} holds layers {begin.first_layer}+{begin.num_layers}; "
                f"expected {part.first_layer}+{part.num_layers} (prefill's pipeline split is not the one its handoff named)"
            )
        layout = self.layout
        start, stop = spec.first_block, spec.first_block + len(spec.block_ids)
        if start < begin.first_block:
            # Prefill skipped blocks the router saw in this worker's cache, and they
            # were evicted before the request came: recompute rather than read holes.
            self.stats.add("transfers_missing_prefix")
            return (f"transfer {spec.transfer_id} starts at block {begin.first_block} (decode was to hold the ones "
                    f"before) but this request found only {start} blocks in the local prefix cache")
        indexes: dict[tuple[int, int], torch.Tensor] = {}  # every layer of a block range goes to the same blocks
        try:
            for chunk in transfer.chunks:
                h = chunk.header
                lo, hi = max(h.first_block, start), min(h.first_block + h.num_blocks, stop)
                if lo >= hi:
                    continue  # these blocks were a local prefix-cache hit
                index = indexes.get((lo, hi))
                if index is None:
                    device = layout.tensors[0].device
                    index = indexes[(lo, hi)] = layout.block_index(spec.block_ids[lo - start : hi - start], device)
                blocks = codec.decode(chunk.payload, h.encoding, h.dtype, h.shape)
                layout.scatter(layout.local[h.layer], index, blocks[lo - h.first_block : hi - h.first_block], part.heads)
        except (RuntimeError, ValueError) as exc:
            # The transfer was verified against this cache's layout when it
            # arrived: failing to write it is a bug, not bad input.
            logger.exception("kvtransfer: transfer %s could not be written into the cache", spec.transfer_id)
            self.stats.add("internal_errors")
            return f"transfer {spec.transfer_id} could not be written into the cache: {exc}"
        return None

    def _fail(self, request_id: str, error: str) -> None:
        logger.warning("kvtransfer: request %s will recompute its prompt: %s", request_id, error)
        self._pending.pop(request_id, None)
        self._failed.add(request_id)
        self._finished.add(request_id)
        self.stats.add("transfers_loaded_failed")

    def take_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(finished_recving, failed_recving) since the last call."""
        self.poll()
        for request_id in finished_req_ids & set(self._pending):
            # Aborted while waiting for its KV: vLLM frees its blocks once we report it.
            spec = self._pending.pop(request_id).spec
            if self.receiver is not None:
                for part in self.parts(spec):  # every part's bytes go now, not at lease expiry
                    self.receiver.forget(spec.transfer_id + part.suffix, "request aborted")
            self._finished.add(request_id)
        finished, failed = self._finished, self._failed
        self._finished, self._failed = set(), set()
        return finished, failed
