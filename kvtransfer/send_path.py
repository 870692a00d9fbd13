"""Prefill's send path: this rank's KV of each request, layer by layer, to the decode ranks.

`save_layer` runs right after each attention layer wrote this step's KV; it
gathers the request's finished blocks of that layer (one copy: paged blocks
are not contiguous) and queues them, without another copy, on the sender's
socket thread, split into the parts each decode rank needs
(kvtransfer.reshard). `finish_step` closes a transfer with End once its last
prompt block went out, and tells decode to drop transfers whose request
ended early. The gathered copy belongs to the transfer, so the engine may
reuse the paged blocks as soon as the step ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtransfer.cache_layout import CacheLayout
from kvtransfer.framing import begin_message, end_message, layer_chunks
from kvtransfer.endpoints import rank_endpoint
from kvtransfer.metadata import HexConnectorMetadata, SendSpec
from kvtransfer.options import ConnectorOptions
from kvtransfer.reshard import Part, RankShape, send_parts
from kvtransfer.sender import KVSender


@dataclass(slots=True)
class _Progress:
    """One part's messages so far (End declares them)."""

    num_chunks: int = 0
    payload_bytes: int = 0
    begun: bool = False
    failed: bool = False


class SendPath:
    def __init__(self, options: ConnectorOptions, layout: CacheLayout, rank: RankShape, sender: KVSender) -> None:
        self.options = options
        self.layout = layout
        self.rank = rank
        self.sender = sender
        self._parts: dict[tuple[int, tuple[int, ...] | None], list[Part]] = {}
        self._progress: dict[tuple[str, int], _Progress] = {}  # (transfer_id, decode rank)

    def parts(self, decode_tp: int, decode_layers: tuple[int, ...] | None = None) -> list[Part]:
        """Every part this rank sends to a decode engine of this TP and split (cached)."""
        key = (decode_tp, decode_layers)
        if key not in self._parts:
            self._parts[key] = send_parts(self.rank, decode_tp, decode_layers)
        return self._parts[key]

    def save_layer(self, meta: HexConnectorMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        layer = self.layout.number.get(layer_name)
        if layer is None:
            return
        for spec in meta.sends:
            targets = [part for part in self.parts(spec.decode_tp, spec.decode_layers) if part.holds(layer)]
            if not targets:
                continue
            blocks = self.layout.gather(kv_layer, spec.block_ids)
            for part in targets:
                transfer_id = spec.transfer_id + part.suffix
                progress = self._progress.setdefault((transfer_id, part.rank), _Progress())
                if progress.failed:
                    continue
                data = blocks if part.heads is None else self.layout.heads_of(blocks, part.heads)
                if spec.is_first and not progress.begun:
                    progress.begun = True
                    self._send_begin(spec, transfer_id, part, tuple(data.shape[1:]), progress)
                self._send_chunks(spec, transfer_id, part.rank, layer, data, progress)

    def _send_chunks(
        self, spec: SendSpec, transfer_id: str, target: int, layer: int, blocks: torch.Tensor, progress: _Progress
    ) -> None:
        if progress.failed:
            return
        endpoint = rank_endpoint(spec.endpoint, target)
        # Long prompts: several chunks per layer, each a view of `blocks` (no copy).
        for frames in layer_chunks(
            transfer_id, layer, spec.first_block, blocks,
            max_chunk_bytes=self.options.max_chunk_bytes, encoding=self.options.encoding, checksum=self.options.checksum,
        ):
            payload = frames[1]
            if not self.sender.submit(endpoint, transfer_id, frames, len(payload)):
                progress.failed = True
                return
            progress.num_chunks += 1
            progress.payload_bytes += len(payload)

    def _send_begin(
        self, spec: SendSpec, transfer_id: str, part: Part, block_shape: tuple[int, ...], progress: _Progress
    ) -> None:
        frames = begin_message(
            transfer_id, spec.request_id, prompt_hash=spec.prompt_hash, num_tokens=spec.num_tokens,
            first_layer=part.first_layer, num_layers=part.num_layers, num_blocks=spec.num_blocks,
            dtype=self.layout.dtype, block_shape=block_shape, encoding=self.options.encoding,
        )
        if not self.sender.submit(rank_endpoint(spec.endpoint, part.rank), transfer_id, frames, 0):
            progress.failed = True

    def finish_step(self, meta: HexConnectorMetadata) -> None:
        """After the step's forward pass: drop transfers whose request ended
        early, and End every part whose last prompt block went out."""
        for drop in meta.drops:
            for part in self.parts(drop.decode_tp, drop.decode_layers):
                transfer_id = drop.transfer_id + part.suffix
                self._progress.pop((transfer_id, part.rank), None)
                self.sender.drop(rank_endpoint(drop.endpoint, part.rank), transfer_id, "prefill request ended before its prompt was computed")
        for spec in meta.sends:
            if not spec.is_last:
                continue
            for part in self.parts(spec.decode_tp, spec.decode_layers):
                transfer_id = spec.transfer_id + part.suffix
                progress = self._progress.pop((transfer_id, part.rank), _Progress())
                if progress.failed:
                    continue
                frames = end_message(transfer_id, progress.num_chunks, progress.payload_bytes)
                self.sender.submit(rank_endpoint(spec.endpoint, part.rank), transfer_id, frames, 0, is_end=True)
