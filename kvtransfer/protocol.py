"""Every message kvtransfer puts on the wire, its version and its size limits.

A transfer moves one request's prompt KV cache from a prefill worker (the
sender, a ZeroMQ DEALER) to a decode worker (the receiver, a ROUTER):

    sender                                   receiver
    Begin(transfer, layers, blocks, ...) ──▶ reserve buffer bytes (or refuse)
    Chunk(layers, first_block, ...) + payloads ──▶ validate, keep the frames
    ... Chunks per step of the prefill: one layer's blocks, or several
        consecutive layers packed into one message when each is small ...
    End(num_chunks, total bytes)   ──▶ check every (layer, block) arrived
                                   ◀── Ack(ok | error)
    DropTransfer(reason)           ──▶ drop what arrived (prefill gave up)

Framing: a message is one or more ZeroMQ frames. Frame 0 is the header, a
msgpack array whose first element is the type tag and whose second is the
protocol version; a Chunk's frame 1 is its payload: its layers' blocks back
to back, in layer order, covered by one checksum. One ZeroMQ
message may carry several of these back to back, all of one transfer: the
send path puts Begin in front of a transfer's first Chunk and End after its
last, so a short prompt's whole transfer is one message (each message costs
a hand-off to the socket thread, a ZeroMQ send and an assembler round). "Blocks" are the request's logical KV blocks (0 is its
first block), so the two sides' physical block ids never need to agree.

All limits are checked on the header before the receiver allocates anything
for the payload: the receiver socket also refuses any frame larger than
`Limits.max_frame_bytes` (ZMQ_MAXMSGSIZE) before ZeroMQ buffers it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from collections.abc import Sequence
from typing import NoReturn, Union

import msgspec

from common.wire import ProtocolError

# 2: Begin carries first_layer and Chunk.layer is the model's layer index (a
# pipeline stage sends a part holding only its own layers).
# 3: Chunk.num_layers: one message may carry several consecutive layers (one
# payload frame each), so short prompts move in fewer, larger messages. A
# version-2 peer refuses version-3 messages by version (decode recomputes).
# 4: Begin.first_block (blocks decode already holds are not sent); 5: several messages of one transfer
# in one ZeroMQ message (Begin + Chunk, Chunk + End). 6: a packed Chunk's layers share one payload
# frame (version 3-5 sent one frame per layer: measured here, 64 KiB zero-copy frames move at 0.38 GB/s
# against 2.18 GB/s for 8 MiB ones, pyzmq's per-frame bookkeeping; docs/kvtransfer.md "Wire protocol").
PROTOCOL_VERSION = 6

# dtypes a payload may carry, with their element size in bytes.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}
ENCODINGS = ("raw", "int8")
# Payload checksums, fastest first (one core, 8 MiB buffers, measured here,
# docs/kvtransfer.md "Integrity"): xxh3 (package xxhash) 28 GB/s from memory,
# 53-63 GB/s from cache; blake3 (a vLLM dependency) ~5 GB/s; crc32 (zlib)
# ~2 GB/s; none. Hardware CRC32C (SSE4.2, packages crc32c / google-crc32c)
# measured 14-26 GB/s, slower than xxh3, so it is not offered. Which one a
# link uses by default is options.resolve_checksum's policy ("auto").
CHECKSUMS = ("xxh3", "blake3", "crc32", "none")


def _default_checksum() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "blake3"
    return "xxh3"


DEFAULT_CHECKSUM = _default_checksum()


# Default for the largest payload one Chunk carries (senders split a layer's
# blocks into ranges below it; ConnectorOptions.max_chunk_bytes). Under glibc's
# 32 MiB mmap ceiling, so a receiver reuses freed frames (kvtransfer.allocator);
# large enough that per-message costs stay negligible.
MAX_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes the receiver accepts. Defaults fit a 70B model's 8k-token layer chunks."""

    max_header_bytes: int = 4096
    max_payload_bytes: int = 512 * 1024 * 1024  # one chunk: one layer, some blocks
    max_transfer_bytes: int = 16 * 1024 * 1024 * 1024  # one request, all layers
    max_layers: int = 1024
    max_blocks: int = 1 << 20
    max_id_chars: int = 256

    @property
    def max_frame_bytes(self) -> int:
        return max(self.max_header_bytes, self.max_payload_bytes)


class Begin(msgspec.Struct, tag="begin", array_like=True, frozen=True):
    """Opens a transfer. `reserve_bytes` bounds the sum of all its payloads."""

    version: int
    transfer_id: str
    request_id: str
    prompt_hash: str  # hash of the prompt's token ids: decode checks it is the same prompt
    num_tokens: int
    num_layers: int
    num_blocks: int
    dtype: str
    block_shape: tuple[int, ...]  # one block of one layer, as the sender's cache holds it
    encoding: str
    reserve_bytes: int
    # The transfer holds the model's layers [first_layer, first_layer + num_layers);
    # a pipeline stage's part starts past 0 (Chunk.layer is in that range).
    first_layer: int = 0
    # and the prompt's blocks [first_block, num_blocks): the router saw the decode
    # worker's prefix cache hold the blocks before, so they do not travel.
    first_block: int = 0


class Chunk(msgspec.Struct, tag="chunk", array_like=True, frozen=True):
    """Blocks [first_block, first_block + num_blocks) of layers [layer, layer +
    num_layers); frame 1 holds each layer's payload, back to back in layer
    order. `shape` and `payload_bytes` describe one layer's payload (the frame
    is num_layers x payload_bytes); `checksum` covers the frame."""

    version: int
    transfer_id: str
    layer: int
    first_block: int
    num_blocks: int
    dtype: str
    shape: tuple[int, ...]  # decoded tensor: (num_blocks, *block_shape)
    encoding: str
    payload_bytes: int  # of one layer's payload (the payload frame holds num_layers of these)
    checksum_kind: str
    checksum: int
    num_layers: int = 1


class End(msgspec.Struct, tag="end", array_like=True, frozen=True):
    version: int
    transfer_id: str
    num_chunks: int
    total_payload_bytes: int


class DropTransfer(msgspec.Struct, tag="abort", array_like=True, frozen=True):
    """Sender → receiver: drop this transfer, it will not be completed (its
    request ended early, or the sender gave up). Not the control plane's Abort
    of a request (engine.control_protocol): this one only concerns KV bytes.
    The wire tag stays "abort" (since protocol version 2)."""

    version: int
    transfer_id: str
    reason: str


class Ack(msgspec.Struct, tag="ack", array_like=True, frozen=True):
    """Receiver → sender: the transfer is complete (ok) or refused (error says why)."""

    version: int
    transfer_id: str
    ok: bool
    error: str = ""


Message = Union[Begin, Chunk, End, DropTransfer, Ack]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_header(frame: bytes | memoryview, limits: Limits) -> Message:
    """Decode and validate frame 0. Raises ProtocolError naming what is wrong."""
    if len(frame) > limits.max_header_bytes:
        raise ProtocolError(
            f"header is {len(frame)} bytes; the limit is max_header_bytes={limits.max_header_bytes}"
        )
    try:
        message = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"header does not match the schema: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    validate(message, limits)
    return message


def _refuse(text: str) -> NoReturn:
    raise ProtocolError(text)


# Every message on the data path goes through validate(): each check formats
# its error text only when it fails (eager f-strings cost more than the checks).
def validate(message: Message, limits: Limits) -> None:
    """Checks that need no transfer state: version, ids, dtypes, sizes."""
    if message.version != PROTOCOL_VERSION:
        _refuse(f"version={message.version}; this receiver speaks version {PROTOCOL_VERSION}")
    if not 0 < len(message.transfer_id) <= limits.max_id_chars:
        _refuse(f"transfer_id must be 1..{limits.max_id_chars} characters")
    if isinstance(message, Chunk):
        _validate_chunk(message, limits)
    elif isinstance(message, Begin):
        _validate_begin(message, limits)
    elif isinstance(message, End):
        if message.num_chunks < 0:
            _refuse(f"num_chunks={message.num_chunks} must be >= 0")
        if message.total_payload_bytes < 0:
            _refuse("total_payload_bytes must be >= 0")


def _validate_encoding(message: Begin | Chunk) -> None:
    if message.dtype not in DTYPE_BYTES:
        _refuse(f"dtype={message.dtype!r}; known: {sorted(DTYPE_BYTES)}")
    if message.encoding not in ENCODINGS:
        _refuse(f"encoding={message.encoding!r}; known: {ENCODINGS}")


def _validate_begin(message: Begin, limits: Limits) -> None:
    _validate_encoding(message)
    if not 0 < message.num_layers <= limits.max_layers:
        _refuse(f"num_layers={message.num_layers} is outside 1..{limits.max_layers}")
    if not 0 <= message.first_layer <= limits.max_layers - message.num_layers:
        _refuse(f"first_layer={message.first_layer} + num_layers={message.num_layers} is outside 0..{limits.max_layers}")
    if not 0 < message.num_blocks <= limits.max_blocks:
        _refuse(f"num_blocks={message.num_blocks} is outside 1..{limits.max_blocks}")
    if message.num_tokens <= 0:
        _refuse(f"num_tokens={message.num_tokens} must be > 0")
    if not (len(message.block_shape) > 0 and all(d > 0 for d in message.block_shape)):
        _refuse(f"block_shape={message.block_shape} must be non-empty with positive dimensions")
    raw = raw_bytes(message.dtype, (message.num_layers, message.num_blocks, *message.block_shape))
    if not 0 < message.reserve_bytes <= min(raw, limits.max_transfer_bytes):
        _refuse(
            f"reserve_bytes={message.reserve_bytes} must be in 1..min(raw size {raw}, "
            f"max_transfer_bytes={limits.max_transfer_bytes})"
        )


def _validate_chunk(message: Chunk, limits: Limits) -> None:
    _validate_encoding(message)
    if message.checksum_kind not in CHECKSUMS:
        _refuse(f"checksum_kind={message.checksum_kind!r}; known: {CHECKSUMS}")
    if message.layer < 0:
        _refuse(f"layer={message.layer} must be >= 0")
    if not 0 < message.num_layers <= limits.max_layers:
        _refuse(f"num_layers={message.num_layers} is outside 1..{limits.max_layers}")
    if message.first_block < 0:
        _refuse(f"first_block={message.first_block} must be >= 0")
    if message.num_blocks <= 0:
        _refuse(f"num_blocks={message.num_blocks} must be > 0")
    shape = message.shape
    if not (len(shape) >= 2 and shape[0] == message.num_blocks and min(shape) > 0):
        _refuse(f"shape={shape} must be (num_blocks={message.num_blocks}, *block_shape) with positive dims")
    expected = payload_bytes(message.encoding, message.dtype, shape)
    if message.payload_bytes != expected:
        _refuse(
            f"payload_bytes={message.payload_bytes} but shape {shape} of {message.dtype} "
            f"encoded as {message.encoding} takes {expected}"
        )
    if message.payload_bytes * message.num_layers > limits.max_payload_bytes:
        _refuse(
            f"payload_bytes={message.payload_bytes} x num_layers={message.num_layers} exceeds "
            f"max_payload_bytes={limits.max_payload_bytes}"
        )


def raw_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def int8_scale_count(shape: tuple[int, ...]) -> int:
    """int8 keeps one float32 scale per channel: every element of one block row
    over the token axis (see codec.quantize_int8). shape = (num_blocks, *block_shape)."""
    return math.prod(shape[1:]) // token_axis_size(shape)


def token_axis_size(shape: tuple[int, ...]) -> int:
    # The block's token axis is the largest of its leading dims on every layout we
    # move (CPU: [heads, block_size, 2*head_size]); codec uses the same rule.
    return shape[1 + token_axis(shape[1:])]


def token_axis(block_shape: tuple[int, ...]) -> int:
    """Index, within a block's shape, of the axis scales are shared along."""
    if len(block_shape) == 1:
        return 0
    leading = block_shape[:-1]
    return max(range(len(leading)), key=lambda i: leading[i])


def payload_bytes(encoding: str, dtype: str, shape: tuple[int, ...]) -> int:
    if encoding == "raw":
        return raw_bytes(dtype, shape)
    return math.prod(shape) + 4 * int8_scale_count(shape)


def checksum(kind: str, payloads: Sequence[bytes | memoryview]) -> int:
    """Checksum of the payloads as one byte string (streamed: nothing is joined)."""
    if kind == "none":
        return 0
    if kind == "xxh3":
        import xxhash

        if len(payloads) == 1:
            return xxhash.xxh3_64_intdigest(payloads[0])
        state = xxhash.xxh3_64()
        for payload in payloads:
            state.update(payload)
        return state.intdigest()
    if kind == "blake3":
        import blake3

        hasher = blake3.blake3()
        for payload in payloads:
            hasher.update(payload)
        return int.from_bytes(hasher.digest(8), "little")
    value = 0
    for payload in payloads:
        value = zlib.crc32(payload, value)
    return value
