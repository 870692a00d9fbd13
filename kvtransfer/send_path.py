"""Prefill's send path: this rank's KV of each request, layer by layer, to the decode ranks.

`save_layer` runs right after each attention layer wrote this step's KV; it
gathers the request's finished blocks of that layer (one copy: paged blocks
are not contiguous) into the message they leave in, for each part a decode
rank needs (kvtransfer.reshard), and queues it on the sender's socket
thread. `finish_step` closes a transfer with End once its last prompt block
went out, and tells decode to drop transfers whose request ended early. The gathered copy belongs to the transfer, so the engine may
reuse the paged blocks as soon as the step ends.

Packing: a layer's blocks larger than `max_chunk_bytes` go at once, in
chunks of at most that. Smaller ones (short prompts, or a chunked prefill's
step) wait for the next layers and go as one message of several
consecutive layers, up to `max_chunk_bytes`, each gathered straight into
its slot of one buffer, the message's one payload frame; what is left goes
at the end of the step. Every message costs a hand-off to the I/O thread, a
header and an assembler round on decode (tens of µs), so a 2 MiB prompt
moved as 32 messages ran at half the raw socket's rate; and every frame
costs pyzmq's zero-copy bookkeeping (64 KiB frames move at a sixth of 8 MiB
ones' rate, measured), so the packed layers share one frame (protocol
version 6) at no extra copy. For the same reason Begin waits for the transfer's first
Chunk message and End rides on the last one packed at the end of the step
(protocol version 5): a short prompt's transfer is one message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvtransfer import codec
from kvtransfer.cache_layout import CacheLayout
from kvtransfer.framing import begin_message, block_ranges, chunk_message, end_message, layer_chunks, message_payload_bytes
from kvtransfer.endpoints import rank_endpoint
from kvtransfer.metadata import HexConnectorMetadata, SendSpec
from kvtransfer.options import ConnectorOptions, link_checksum
from kvtransfer.protocol import DTYPE_BYTES
from kvtransfer.reshard import Part, RankShape, send_parts
from kvtransfer.sender import KVSender


@dataclass(slots=True)
class _Pack:
    """Consecutive layers of one part, same blocks, gathered into one buffer that goes as one message."""

    endpoint: str
    first_layer: int
    first_block: int
    buffer: torch.Tensor  # (capacity, num_blocks, *block_shape): the message's one payload frame
    count: int = 0

    def takes(self, layer: int, first_block: int, shape: tuple[int, ...]) -> bool:
        return (
            layer == self.first_layer + self.count
            and first_block == self.first_block
            and shape == tuple(self.buffer.shape[1:])
            and self.count < self.buffer.shape[0]
        )

    @property
    def full(self) -> bool:
        return self.count == self.buffer.shape[0]

    def layers(self) -> torch.Tensor:
        return self.buffer[: self.count]


@dataclass(slots=True)
class _Progress:
    """One part's messages so far (End declares them)."""

    num_chunks: int = 0
    payload_bytes: int = 0
    begun: bool = False
    failed: bool = False
    pack: _Pack | None = None
    begin: list | None = None  # Begin's frames, held until the first Chunk message carries them


class SendPath:
    def __init__(self, options: ConnectorOptions, layout: CacheLayout, rank: RankShape, sender: KVSender) -> None:
        self.options = options
        self.layout = layout
        self.rank = rank
        self.sender = sender
        self._parts: dict[tuple[int, tuple[int, ...] | None], list[Part]] = {}
        self._progress: dict[tuple[str, int], _Progress] = {}  # (transfer_id, decode rank)
        self._checksums: dict[str, str] = {}  # decode endpoint -> payload checksum (options.link_checksum)
        self._indexes: dict[int, list[tuple[int, torch.Tensor]]] = {}  # id(SendSpec) -> _block_ranges, this step

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
            # A block range at a time, each at most max_chunk_bytes: under glibc's
            # mmap ceiling, so freed buffers are reused (KVSender keeps freed
            # memory) instead of fresh pages faulted in for every layer.
            ranges = self._block_ranges(spec, kv_layer.device)
            for offset, index in ranges:
                gathered: torch.Tensor | None = None  # the range's blocks, all heads: gathered once for every part
                for part in targets:
                    transfer_id = spec.transfer_id + part.suffix
                    progress = self._progress.setdefault((transfer_id, part.rank), _Progress())
                    if progress.failed:
                        continue
                    shape = (len(index), *self._part_block_shape(part))
                    if spec.is_first and not progress.begun:
                        progress.begun = True
                        self._send_begin(spec, transfer_id, part, shape[1:], progress)
                    first_block = spec.first_block + offset
                    slot = self._pack_slot(spec, transfer_id, part, layer, first_block, shape, progress, len(ranges) == 1)
                    if slot is None:  # one block is larger than a message: chunks of it, views of one gather
                        gathered = self.layout.gather(kv_layer, index) if gathered is None else gathered
                        data = gathered if part.heads is None else self.layout.heads_of(gathered, part.heads)
                        self._send_chunks(spec, transfer_id, part.rank, layer, first_block, data, progress)
                    elif gathered is None and part.heads is None:
                        gathered = self.layout.gather(kv_layer, index, out=slot)  # straight into the message
                    else:
                        gathered = self.layout.gather(kv_layer, index) if gathered is None else gathered
                        slot.copy_(gathered if part.heads is None else self.layout.heads_view(gathered, part.heads))
                    if slot is not None:
                        progress.pack.count += 1
                        # A full message goes now, but the transfer's last waits for finish_step to carry End.
                        last = spec.is_last and offset == ranges[-1][0] and layer == part.first_layer + part.num_layers - 1
                        if progress.pack.full and not last:
                            self._flush(transfer_id, progress)

    def _part_block_shape(self, part: Part) -> tuple[int, ...]:
        shape = list(self.layout.block_shape)
        if part.heads is not None:
            shape[self.layout.head_axis] = part.heads.stop - part.heads.start
        return tuple(shape)

    def _pack_slot(
        self, spec: SendSpec, transfer_id: str, part: Part, layer: int, first_block: int, shape: tuple[int, ...],
        progress: _Progress, one_range: bool,
    ) -> torch.Tensor | None:
        """Where this layer's blocks go in the part's message (a new message when the waiting one
        cannot take them); None when they are larger than a message. Layers share a message only
        when the step's blocks are one range (`one_range`): with several, the next layer's first
        range follows this one's last, so a message holds one layer and its buffer no more."""
        max_bytes = self.options.max_chunk_bytes
        nbytes = math.prod(shape) * DTYPE_BYTES[self.layout.dtype]
        pack = progress.pack
        if pack is not None and not pack.takes(layer, first_block, shape):
            self._flush(transfer_id, progress)
        if nbytes > max_bytes:
            return None
        if progress.pack is None:
            # Room for the layers that fit in a message, no more than the part has left from here.
            capacity = min(max_bytes // nbytes, part.first_layer + part.num_layers - layer) if one_range else 1
            buffer = torch.empty((capacity, *shape), dtype=codec.TORCH_DTYPES[self.layout.dtype])
            progress.pack = _Pack(rank_endpoint(spec.endpoint, part.rank), layer, first_block, buffer)
        return progress.pack.buffer[progress.pack.count]

    def _block_ranges(self, spec: SendSpec, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        """(offset, index tensor) of each range of the step's blocks that one gather
        copies, at most max_chunk_bytes each; built once per step, not per layer."""
        ranges = self._indexes.get(id(spec))
        if ranges is None:
            block_bytes = math.prod(self.layout.block_shape) * DTYPE_BYTES[self.layout.dtype]
            ranges = self._indexes[id(spec)] = [
                (first, self.layout.block_index(spec.block_ids[first : first + count], device))
                for first, count in block_ranges(len(spec.block_ids), block_bytes, self.options.max_chunk_bytes)
            ]
        return ranges

    def _send_chunks(
        self, spec: SendSpec, transfer_id: str, target: int, layer: int, first_block: int, blocks: torch.Tensor, progress: _Progress
    ) -> None:
        """A layer's blocks larger than a message: several chunks, each a view of `blocks` (no copy)."""
        endpoint = rank_endpoint(spec.endpoint, target)
        for frames in layer_chunks(
            transfer_id, layer, first_block, blocks,
            max_chunk_bytes=self.options.max_chunk_bytes, encoding=self.options.encoding, checksum=self._checksum(endpoint),
        ):
            if not self._submit(endpoint, transfer_id, frames, progress):
                return

    def _flush(self, transfer_id: str, progress: _Progress, end: bool = False) -> None:
        """Send the part's waiting layers as one message (with End after them: the transfer's last)."""
        pack, progress.pack = progress.pack, None
        if pack is None or progress.failed:
            return
        frames = chunk_message(
            transfer_id, pack.first_layer, pack.first_block, pack.layers(),
            encoding=self.options.encoding, checksum=self._checksum(pack.endpoint), stacked=True,
        )
        self._submit(pack.endpoint, transfer_id, frames, progress, end)

    def _checksum(self, endpoint: str) -> str:
        kind = self._checksums.get(endpoint)
        if kind is None:
            kind = self._checksums[endpoint] = link_checksum(self.options.checksum, endpoint)
        return kind

    def _submit(self, endpoint: str, transfer_id: str, frames: list, progress: _Progress, end: bool = False) -> bool:
        """One Chunk message; Begin in front if not yet sent, End after it when `end`."""
        nbytes = message_payload_bytes(frames)
        progress.num_chunks += 1
        progress.payload_bytes += nbytes
        if progress.begin is not None:
            frames, progress.begin = progress.begin + frames, None
        if end:
            frames = frames + end_message(transfer_id, progress.num_chunks, progress.payload_bytes)
        if not self.sender.submit(endpoint, transfer_id, frames, nbytes, is_end=end):
            progress.failed = True
            return False
        return True

    def _send_begin(
        self, spec: SendSpec, transfer_id: str, part: Part, block_shape: tuple[int, ...], progress: _Progress
    ) -> None:
        progress.begin = begin_message(
            transfer_id, spec.request_id, prompt_hash=spec.prompt_hash, num_tokens=spec.num_tokens,
            first_layer=part.first_layer, num_layers=part.num_layers, num_blocks=spec.num_blocks,
            dtype=self.layout.dtype, block_shape=block_shape, encoding=self.options.encoding,
            first_block=spec.first_block,  # the first send starts past the blocks decode holds
        )

    def finish_step(self, meta: HexConnectorMetadata) -> None:
        """After the step's forward pass: send the layers still packed, drop
        transfers whose request ended early, and End every part whose last
        prompt block went out."""
        self._indexes.clear()
        ending = {(spec.transfer_id + part.suffix, part.rank) for spec in meta.sends if spec.is_last
                  for part in self.parts(spec.decode_tp, spec.decode_layers)}
        for key, progress in self._progress.items():
            if progress.pack is not None and key not in ending:  # an ending part's pack carries its End
                self._flush(key[0], progress)
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
                if progress.pack is not None:
                    self._flush(transfer_id, progress, end=True)
                    continue
                frames = (progress.begin or []) + end_message(transfer_id, progress.num_chunks, progress.payload_bytes)
                self.sender.submit(rank_endpoint(spec.endpoint, part.rank), transfer_id, frames, 0, is_end=True)
