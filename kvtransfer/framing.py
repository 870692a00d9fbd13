"""The one builder of KV messages: each returns a message's frame list, ready to send.

The connector's send path builds a transfer incrementally (Begin on its first
step, a layer's chunks right after that layer's forward pass, End on its last
step); `transfer_messages` builds a whole transfer from one tensor, for the
tests (valid frames to mutate) and anyone replaying a transfer by hand; the
throughput benchmark sends what the send path sends, built here too.
A one-layer Chunk's payload is a zero-copy view of the tensor for raw encoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from kvtransfer import codec, protocol
from kvtransfer.protocol import Begin, Chunk, DropTransfer, End


def block_ranges(num_blocks: int, block_bytes: int, max_chunk_bytes: int = protocol.MAX_CHUNK_BYTES) -> list[tuple[int, int]]:
    """(first, count) ranges covering num_blocks, each at most max_chunk_bytes (at least one block)."""
    step = max(1, max_chunk_bytes // max(1, block_bytes))
    return [(first, min(step, num_blocks - first)) for first in range(0, num_blocks, step)]


def begin_message(
    transfer_id: str,
    request_id: str,
    *,
    prompt_hash: str,
    num_tokens: int,
    first_layer: int,
    num_layers: int,
    num_blocks: int,
    dtype: str,
    block_shape: tuple[int, ...],
    encoding: str = "raw",
    first_block: int = 0,
) -> list:
    """[header] opening a transfer of layers [first_layer, first_layer + num_layers)
    x blocks [first_block, num_blocks); it reserves their raw size at the receiver."""
    reserve_bytes = protocol.raw_bytes(dtype, (num_layers, num_blocks - first_block, *block_shape))
    begin = Begin(
        protocol.PROTOCOL_VERSION, transfer_id, request_id, prompt_hash, num_tokens, num_layers, num_blocks,
        dtype, tuple(block_shape), encoding, reserve_bytes, first_layer, first_block,
    )
    return [protocol.encode(begin)]


def chunk_message(
    transfer_id: str,
    layer: int,
    first_block: int,
    blocks: torch.Tensor | Sequence[torch.Tensor],
    *,
    encoding: str = "raw",
    checksum: str = protocol.DEFAULT_CHECKSUM,
    stacked: bool = False,
) -> list:
    """[header, payload] for blocks (num_blocks, *block_shape) of one layer, or
    of consecutive layers from `layer` on (same blocks), their payloads back to
    back in one frame: given as a list (joined here: one copy), or `stacked`,
    one tensor (num_layers, num_blocks, *block_shape) as the send path gathers
    them. A raw payload of one tensor is a view of it (no copy). One frame per
    layer cost pyzmq's per-frame bookkeeping (see protocol version 6)."""
    if stacked:
        assert isinstance(blocks, torch.Tensor)
        num_layers, one_layer = blocks.shape[0], blocks[0]
        payload = (_payload(blocks, encoding) if encoding == "raw"
                   else _join([_payload(tensor, encoding) for tensor in blocks.unbind(0)]))
    else:
        layers = [blocks] if isinstance(blocks, torch.Tensor) else list(blocks)
        num_layers, one_layer = len(layers), layers[0]
        payloads = [_payload(tensor, encoding) for tensor in layers]
        payload = payloads[0] if len(payloads) == 1 else _join(payloads)
    shape = tuple(int(d) for d in one_layer.shape)
    header = Chunk(
        protocol.PROTOCOL_VERSION,
        transfer_id,
        layer,
        first_block,
        shape[0],
        codec.dtype_name(one_layer.dtype),
        shape,
        encoding,
        len(payload) // num_layers,
        checksum,
        protocol.checksum(checksum, [payload]),
        num_layers,
    )
    return [protocol.encode(header), payload]


def _payload(blocks: torch.Tensor, encoding: str) -> memoryview:
    parts = codec.encode(blocks, encoding)
    if len(parts) == 1:
        return codec.as_bytes(parts[0])
    return codec.as_bytes(torch.cat([p.reshape(-1).view(torch.uint8) for p in parts]))


def _join(payloads: list[memoryview]) -> memoryview:
    return codec.as_bytes(torch.cat([torch.frombuffer(p, dtype=torch.uint8) for p in payloads]))


def message_payload_bytes(frames: list) -> int:
    """Payload bytes of one message's frames (0 for Begin, End, DropTransfer)."""
    return sum(len(frame) for frame in frames[1:])


def coalesce(messages: list[list]) -> list[list]:
    """A transfer's messages as the send path sends them: Begin in front of the first Chunk
    message, End after the last (a transfer without chunks: Begin and End in one)."""
    if len(messages) < 2:
        return [list(m) for m in messages]
    begin, *chunks, end = messages
    if not chunks:
        return [list(begin) + list(end)]
    out = [list(m) for m in chunks]
    out[0] = list(begin) + out[0]
    out[-1] = out[-1] + list(end)
    return out


def layer_chunks(
    transfer_id: str,
    layer: int,
    first_block: int,
    blocks: torch.Tensor,
    *,
    max_chunk_bytes: int = protocol.MAX_CHUNK_BYTES,
    encoding: str = "raw",
    checksum: str = protocol.DEFAULT_CHECKSUM,
) -> Iterator[list]:
    """Chunk messages for one layer's blocks (n, *block_shape), numbered from
    first_block, each payload at most max_chunk_bytes (at least one block) and
    a view of `blocks`. Built one at a time, as the sender takes them."""
    block_bytes = math.prod(blocks.shape[1:]) * blocks.element_size()
    for first, count in block_ranges(int(blocks.shape[0]), block_bytes, max_chunk_bytes):
        yield chunk_message(transfer_id, layer, first_block + first, blocks[first : first + count], encoding=encoding, checksum=checksum)


def end_message(transfer_id: str, num_chunks: int, total_payload_bytes: int) -> list:
    """[header] closing a transfer: the receiver checks it got exactly this much."""
    return [protocol.encode(End(protocol.PROTOCOL_VERSION, transfer_id, num_chunks, total_payload_bytes))]


def drop_message(transfer_id: str, reason: str) -> list:
    """[header] telling the receiver to drop a transfer that will not be completed."""
    return [protocol.encode(DropTransfer(protocol.PROTOCOL_VERSION, transfer_id, reason))]


def transfer_messages(
    transfer_id: str,
    kv: torch.Tensor,
    *,
    num_tokens: int | None = None,
    prompt_hash: str = "0" * 16,
    blocks_per_chunk: int | None = None,
    encoding: str = "raw",
    checksum: str = protocol.DEFAULT_CHECKSUM,
    first_layer: int = 0,
    layers_per_chunk: int = 1,
) -> list[list]:
    """All messages (each a frame list) of one transfer. kv: (layers, blocks, *block_shape),
    holding the model's layers first_layer, first_layer + 1, ... (a pipeline stage's part).
    Chunks go block range by block range, every layer of a range in turn, as
    a chunked prefill sends them step by step; `layers_per_chunk` consecutive
    layers of a range share one message, as the send path packs them."""
    num_layers, num_blocks = int(kv.shape[0]), int(kv.shape[1])
    block_shape = tuple(int(d) for d in kv.shape[2:])
    dtype = codec.dtype_name(kv.dtype)
    block_bytes = protocol.raw_bytes(dtype, block_shape)
    max_chunk_bytes = block_bytes * blocks_per_chunk if blocks_per_chunk else protocol.MAX_CHUNK_BYTES
    messages = [
        begin_message(
            transfer_id, "req-" + transfer_id, prompt_hash=prompt_hash, num_tokens=num_tokens or num_blocks,
            first_layer=first_layer, num_layers=num_layers, num_blocks=num_blocks, dtype=dtype, block_shape=block_shape,
            encoding=encoding,
        )
    ]
    total = 0
    for first, count in block_ranges(num_blocks, block_bytes, max_chunk_bytes):
        for layer in range(0, num_layers, layers_per_chunk):
            packed = [kv[i, first : first + count] for i in range(layer, min(layer + layers_per_chunk, num_layers))]
            frames = chunk_message(transfer_id, first_layer + layer, first, packed, encoding=encoding, checksum=checksum)
            total += message_payload_bytes(frames)
            messages.append(frames)
    messages.append(end_message(transfer_id, len(messages) - 1, total))
    return messages
