"""Build a whole transfer's messages from a KV tensor, outside of vLLM.

Used by the tests (valid frames to mutate), the benchmark (real-model KV
sizes without a real model) and anyone replaying a transfer by hand. The
worker-side connector builds the same messages incrementally, layer by layer.
"""

from __future__ import annotations

import torch

from kvtransfer import codec, protocol
from kvtransfer.protocol import Begin, Chunk, End


def block_ranges(num_blocks: int, block_bytes: int, max_chunk_bytes: int = protocol.MAX_CHUNK_BYTES) -> list[tuple[int, int]]:
    """(first, count) ranges covering num_blocks, each at most max_chunk_bytes (at least one block)."""
    step = max(1, max_chunk_bytes // max(1, block_bytes))
    return [(first, min(step, num_blocks - first)) for first in range(0, num_blocks, step)]


def chunk_message(
    transfer_id: str, layer: int, first_block: int, blocks: torch.Tensor, *, encoding: str = "raw", checksum: str = protocol.DEFAULT_CHECKSUM
) -> list:
    """[header, payload] for blocks (num_blocks, *block_shape) of one layer; payload is zero-copy for raw."""
    parts = codec.encode(blocks, encoding)
    payload = codec.as_bytes(parts[0]) if len(parts) == 1 else codec.as_bytes(
        torch.cat([p.reshape(-1).view(torch.uint8) for p in parts])
    )
    header = Chunk(
        protocol.PROTOCOL_VERSION,
        transfer_id,
        layer,
        first_block,
        int(blocks.shape[0]),
        codec.dtype_name(blocks.dtype),
        tuple(int(d) for d in blocks.shape),
        encoding,
        len(payload),
        checksum,
        protocol.checksum(checksum, payload),
    )
    return [protocol.encode(header), payload]


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
) -> list[list]:
    """All messages (each a frame list) of one transfer. kv: (layers, blocks, *block_shape),
    holding the model's layers first_layer, first_layer + 1, ... (a pipeline stage's part)."""
    num_layers, num_blocks = int(kv.shape[0]), int(kv.shape[1])
    block_shape = tuple(int(d) for d in kv.shape[2:])
    dtype = codec.dtype_name(kv.dtype)
    block_bytes = protocol.raw_bytes(dtype, block_shape)
    max_chunk_bytes = block_bytes * blocks_per_chunk if blocks_per_chunk else protocol.MAX_CHUNK_BYTES
    ranges = block_ranges(num_blocks, block_bytes, max_chunk_bytes)
    messages: list[list] = [
        [
            protocol.encode(
                Begin(
                    protocol.PROTOCOL_VERSION,
                    transfer_id,
                    "req-" + transfer_id,
                    prompt_hash,
                    num_tokens or num_blocks,
                    num_layers,
                    num_blocks,
                    dtype,
                    block_shape,
                    encoding,
                    protocol.raw_bytes(dtype, tuple(kv.shape)),
                    first_layer,
                )
            )
        ]
    ]
    total = 0
    for first, count in ranges:
        for layer in range(num_layers):
            frames = chunk_message(transfer_id, first_layer + layer, first, kv[layer, first : first + count], encoding=encoding, checksum=checksum)
            total += len(frames[1])
            messages.append(frames)
    messages.append([protocol.encode(End(protocol.PROTOCOL_VERSION, transfer_id, len(messages) - 1, total))])
    return messages
