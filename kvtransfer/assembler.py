"""Receive-side state machine: frames in, verified transfers out. No sockets here.

Each transfer moves through:

    (unknown) --Begin--> receiving --Chunk*--> receiving --End--> complete --claim--> claimed
                             |                                       |                   | reclaim_s
                             +-- any bad frame / DropTransfer / timeout --> failed (tombstone, no bytes)
                                                                     +-- lease expires --> (gone)

Nothing leaves this module until a transfer is complete: every (layer, block)
present exactly once, every checksum right, byte counts as declared. A bad
frame fails the transfer it names and drops the bytes already held; the
caller's KV cache is only ever written from a complete transfer. Memory is
bounded: Begin reserves its declared bytes against `max_buffer_bytes` before
any payload is accepted, and unclaimed transfers are dropped when their lease
ends, so a decode request that never comes cannot leak.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from kvtransfer import protocol
from common.wire import ProtocolError
from kvtransfer.protocol import Ack, Begin, Chunk, DropTransfer, End, Limits

logger = logging.getLogger(__name__)

ALREADY_CLAIMED = "already claimed by another request (and its reclaim window passed)"


@dataclass(slots=True)
class ReceivedChunk:
    """One layer's blocks; a packed message is kept as one of these per layer."""

    header: Chunk  # num_layers == 1, layer is this one's
    payload: memoryview | bytes


@dataclass(slots=True)
class Transfer:
    begin: Begin
    deadline_s: float  # receiving: transfer timeout; complete: lease end; failed: tombstone end
    state: str = "receiving"  # receiving | complete | failed
    error: str = ""
    chunks: list[ReceivedChunk] = field(default_factory=list)
    # One byte per (layer, block), set once received: C-speed duplicate checks.
    # Its size is bounded by the bytes Begin reserved (every block is >= 1 byte).
    covered: bytearray = field(default_factory=bytearray)
    covered_count: int = 0
    received_bytes: int = 0
    num_messages: int = 0  # Chunk messages (End counts these; packed ones hold several layers)


@dataclass(frozen=True, slots=True)
class Claim:
    """What claim() found: state is pending, complete or failed."""

    state: str
    transfer: Transfer | None = None
    error: str = ""


@dataclass(slots=True)
class AssemblerCounters:
    transfers_complete: int = 0
    transfers_failed: int = 0
    frames_refused: int = 0
    lease_expiries: int = 0
    bytes_received: int = 0
    internal_errors: int = 0  # exceptions that are not protocol violations (a bug here)


class Assembler:
    """Validates and holds incoming transfers. Not thread-safe: callers lock."""

    def __init__(
        self,
        limits: Limits = Limits(),
        *,
        max_buffer_bytes: int = 2 * 1024**3,
        transfer_timeout_s: float = 30.0,
        lease_s: float = 60.0,
        reclaim_s: float = 5.0,
        expected: Callable[[Begin], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.max_buffer_bytes = max_buffer_bytes
        self.transfer_timeout_s = transfer_timeout_s
        self.lease_s = lease_s
        self.reclaim_s = reclaim_s
        self._expected = expected  # returns an error text if this Begin cannot fit our cache
        self._clock = clock
        self._transfers: dict[str, Transfer] = {}
        self._current_id = ""  # the transfer the message being handled names, once its header decoded
        self.reserved_bytes = 0
        self.counters = AssemblerCounters()

    # -- frames in ---------------------------------------------------------------------------

    def on_frames(self, frames: Sequence[bytes | memoryview]) -> Ack | None:
        """Handle one message. Returns the Ack to send back, if any; never raises.

        A protocol violation is refused by name (the Ack's error says which
        field). Any other exception is a bug here: it is logged with its
        traceback and counted, the transfer the message named fails (decode
        recomputes) and the sender hears why; the decode worker keeps serving."""
        self._current_id = ""
        try:
            return self._on_frames(frames)
        except ProtocolError as exc:
            self.counters.frames_refused += 1
            transfer_id = getattr(exc, "transfer_id", "")
            return Ack(protocol.PROTOCOL_VERSION, transfer_id or "?", False, str(exc))
        except Exception as exc:
            return self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> Ack:
        transfer_id = self._current_id
        logger.exception("kvtransfer: internal error handling a message of transfer %r", transfer_id or "?")
        self.counters.internal_errors += 1
        self.counters.frames_refused += 1
        transfer = self._transfers.get(transfer_id)
        if transfer is not None and transfer.state == "receiving":  # a verified transfer stays loadable
            self._fail_quietly(transfer, f"internal error: {exc!r}")
        return Ack(protocol.PROTOCOL_VERSION, transfer_id or "?", False, f"internal error handling frame: {exc!r}")

    def _on_frames(self, frames: Sequence[bytes | memoryview]) -> Ack | None:
        """One ZeroMQ message: one or more protocol messages of one transfer, back to back."""
        if not frames:
            raise ProtocolError("empty message: expected a header frame")
        ack, index = None, 0
        while index < len(frames):
            try:
                message = protocol.decode_header(frames[index], self.limits)
            except ProtocolError as exc:
                if index:  # what came before in this message belongs to a transfer that cannot be trusted now
                    self._fail(self._current_id, f"frame {index} of a message: {exc}")
                raise
            if index and message.transfer_id != self._current_id:
                self._fail(self._current_id, f"frame {index} of a message names another transfer "
                                             f"({message.transfer_id!r}); one message carries one transfer")
            self._current_id = message.transfer_id
            count = 2 if isinstance(message, Chunk) else 1  # a Chunk's header and its payload frame
            part = frames[index : index + count]
            if len(part) != count or (isinstance(message, DropTransfer) and len(frames) != 1):
                self._fail(message.transfer_id, f"{type(message).__name__} came with {len(part)} frames; expected {count}")
            ack = self._on_message(message, part) or ack
            index += count
        return ack

    def _on_message(self, message, frames: Sequence[bytes | memoryview]) -> Ack | None:
        if isinstance(message, Begin):
            return self._begin(message)
        if isinstance(message, Chunk):
            return self._chunk(message, frames[1:])
        if isinstance(message, End):
            return self._end(message)
        if isinstance(message, DropTransfer):
            self._fail(message.transfer_id, f"sender aborted: {message.reason}", reply=False)
            return None
        raise ProtocolError(f"{type(message).__name__} is not a message a receiver accepts")

    def _begin(self, begin: Begin) -> Ack | None:
        if begin.transfer_id in self._transfers:
            raise _error(begin.transfer_id, f"duplicate Begin for transfer_id={begin.transfer_id!r}; refused")
        if self._expected is not None:
            mismatch = self._expected(begin)
            if mismatch:
                self._tombstone(begin, mismatch)
                raise _error(begin.transfer_id, mismatch)
        if self.reserved_bytes + begin.reserve_bytes > self.max_buffer_bytes:
            text = (
                f"receive buffer full: {self.reserved_bytes} + {begin.reserve_bytes} bytes exceeds "
                f"max_buffer_bytes={self.max_buffer_bytes}"
            )
            self._tombstone(begin, text)
            raise _error(begin.transfer_id, text)
        self.reserved_bytes += begin.reserve_bytes
        transfer = Transfer(begin, self._clock() + self.transfer_timeout_s)
        transfer.covered = bytearray(begin.num_layers * begin.num_blocks)
        self._transfers[begin.transfer_id] = transfer
        return None

    def _receiving(self, transfer_id: str) -> Transfer | None:
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            raise _error(transfer_id, f"transfer_id={transfer_id!r} has no Begin (reordered or unknown); refused")
        if transfer.state == "failed":
            return None  # already failed and answered: drop the rest quietly
        if transfer.state != "receiving":
            raise _error(transfer_id, f"transfer_id={transfer_id!r} is already {transfer.state}; refused")
        return transfer

    def _chunk(self, chunk: Chunk, payloads: Sequence[bytes | memoryview]) -> Ack | None:
        transfer = self._receiving(chunk.transfer_id)
        if transfer is None:
            return None
        begin = transfer.begin
        error = self._chunk_error(chunk, begin, transfer, payloads[0])
        if error:
            self._fail(chunk.transfer_id, error)
        if protocol.checksum(chunk.checksum_kind, payloads) != chunk.checksum:
            self._fail(chunk.transfer_id, f"{_where(chunk)}: checksum mismatch (corrupted payload)")
        transfer.num_messages += 1
        frame, size = memoryview(payloads[0]), chunk.payload_bytes
        for i in range(chunk.num_layers):
            lo = (chunk.layer - begin.first_layer + i) * begin.num_blocks + chunk.first_block
            transfer.covered[lo : lo + chunk.num_blocks] = b"\x01" * chunk.num_blocks
            # Downstream (the load path) sees one layer per entry, packed or not: views, no copy.
            header = chunk if chunk.num_layers == 1 else msgspec.structs.replace(chunk, layer=chunk.layer + i, num_layers=1)
            transfer.chunks.append(ReceivedChunk(header, frame if chunk.num_layers == 1 else frame[i * size : (i + 1) * size]))
        transfer.covered_count += chunk.num_blocks * chunk.num_layers
        nbytes = size * chunk.num_layers
        transfer.received_bytes += nbytes
        self.counters.bytes_received += nbytes
        return None

    @staticmethod
    def _chunk_error(chunk: Chunk, begin: Begin, transfer: Transfer, payload: bytes | memoryview) -> str | None:
        """Why the chunk must be refused (the first reason that applies), or None.
        Every message on the data path comes here: texts are built only on failure."""
        layer = chunk.layer - begin.first_layer
        if chunk.dtype != begin.dtype or chunk.encoding != begin.encoding:
            return f"{_where(chunk)}: dtype/encoding {chunk.dtype}/{chunk.encoding} differ from Begin's {begin.dtype}/{begin.encoding}"
        if tuple(chunk.shape[1:]) != tuple(begin.block_shape):
            return f"{_where(chunk)}: block shape {chunk.shape[1:]} differs from Begin's {begin.block_shape}"
        if (not (0 <= layer and layer + chunk.num_layers <= begin.num_layers)
                or chunk.first_block < begin.first_block or chunk.first_block + chunk.num_blocks > begin.num_blocks):
            return (
                f"{_where(chunk)}: outside layers {begin.first_layer}..{begin.first_layer + begin.num_layers - 1} "
                f"x blocks {begin.first_block}..{begin.num_blocks - 1} that Begin declared"
            )
        if len(payload) != chunk.payload_bytes * chunk.num_layers:
            return (f"{_where(chunk)}: the payload is {len(payload)} bytes; header says {chunk.num_layers} layer(s) "
                    f"of payload_bytes={chunk.payload_bytes} (truncated?)")
        if transfer.received_bytes + chunk.payload_bytes * chunk.num_layers > begin.reserve_bytes:
            return f"{_where(chunk)}: exceeds reserve_bytes={begin.reserve_bytes}"
        for i in range(chunk.num_layers):
            lo = (layer + i) * begin.num_blocks + chunk.first_block  # in range: checked above
            if transfer.covered.find(1, lo, lo + chunk.num_blocks) != -1:
                # A duplicate may carry different bytes: we cannot tell which copy is right.
                return f"{_where(chunk)}: blocks already received (duplicate chunk)"
        return None

    def _end(self, end: End) -> Ack | None:
        transfer = self._receiving(end.transfer_id)
        if transfer is None:
            return None
        begin = transfer.begin
        missing = begin.num_layers * (begin.num_blocks - begin.first_block) - transfer.covered_count
        if missing:
            self._fail(end.transfer_id, f"End arrived with {missing} (layer, block) pairs missing")
        if end.num_chunks != transfer.num_messages or end.total_payload_bytes != transfer.received_bytes:
            self._fail(
                end.transfer_id,
                f"End says {end.num_chunks} chunks / {end.total_payload_bytes} bytes; received "
                f"{transfer.num_messages} / {transfer.received_bytes}",
            )
        transfer.state = "complete"
        transfer.deadline_s = self._clock() + self.lease_s
        transfer.chunks.sort(key=lambda c: (c.header.layer, c.header.first_block))
        self.counters.transfers_complete += 1
        return Ack(protocol.PROTOCOL_VERSION, end.transfer_id, True)

    # -- failures ----------------------------------------------------------------------------

    def _tombstone(self, begin: Begin, error: str) -> None:
        self._transfers[begin.transfer_id] = Transfer(begin, self._clock() + self.lease_s, "failed", error)
        self.counters.transfers_failed += 1

    def _fail(self, transfer_id: str, error: str, reply: bool = True) -> None:
        """Fail a transfer, free its bytes, keep a tombstone so the decode side fails fast."""
        transfer = self._transfers.get(transfer_id)
        if transfer is not None and transfer.state != "failed":
            self._fail_quietly(transfer, error)
        if reply:
            raise _error(transfer_id, error)

    def _release(self, transfer: Transfer) -> None:
        if transfer.state in ("receiving", "complete", "claimed"):
            self.reserved_bytes -= transfer.begin.reserve_bytes

    # -- the decode side ---------------------------------------------------------------------

    def claim(self, transfer_id: str) -> Claim:
        """A finished transfer, if there is one. Claiming starts a grace period
        in which the same transfer can be claimed again: vLLM admits the
        children of a parallel-sampling request (n > 1) one by one, possibly a
        step apart, and each loads the same KV. The period ends with
        `release` (the worker calls it a couple of engine steps later) or
        after `reclaim_s`; then the bytes are dropped and a later claim fails
        fast (decode recomputes). Holding bytes longer than needed costs
        throughput: fresh memory for every transfer instead of reused pages."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None or transfer.state == "receiving":
            return Claim("pending")
        if transfer.state == "failed":  # the tombstone stays until its lease ends (siblings fail fast too)
            return Claim("failed", error=transfer.error)
        if transfer.state == "complete":
            transfer.state = "claimed"
            transfer.deadline_s = self._clock() + self.reclaim_s
        return Claim("complete", transfer)

    def release(self, transfer_id: str) -> None:
        """End a claimed transfer's reclaim window now: its bytes go back at once."""
        transfer = self._transfers.get(transfer_id)
        if transfer is not None and transfer.state == "claimed":
            self._release(transfer)
            self._transfers[transfer_id] = Transfer(transfer.begin, self._clock() + self.lease_s, "failed", ALREADY_CLAIMED)

    def forget(self, transfer_id: str, error: str) -> None:
        """The decode side gave up waiting: fail the transfer if it is still arriving."""
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is not None:
            self._release(transfer)
            if transfer.state == "receiving":
                self.counters.transfers_failed += 1

    def expire(self) -> list[str]:
        """Drop transfers past their deadline; returns their ids."""
        now = self._clock()
        expired = [tid for tid, t in self._transfers.items() if t.deadline_s <= now]
        for tid in expired:
            transfer = self._transfers[tid]
            if transfer.state == "receiving":
                self._fail_quietly(transfer, "transfer timed out before End")
            elif transfer.state == "complete":  # nobody claimed it within the lease
                self.counters.lease_expiries += 1
                self._release(transfer)
                del self._transfers[tid]
            elif transfer.state == "claimed":
                self._release(transfer)
                self._transfers[tid] = Transfer(transfer.begin, now + self.lease_s, "failed", ALREADY_CLAIMED)
            else:
                del self._transfers[tid]
        return expired

    def _fail_quietly(self, transfer: Transfer, error: str) -> None:
        self._release(transfer)
        transfer.state, transfer.error = "failed", error
        transfer.chunks, transfer.covered, transfer.covered_count, transfer.received_bytes = [], bytearray(), 0, 0
        transfer.num_messages = 0
        transfer.deadline_s = self._clock() + self.lease_s
        self.counters.transfers_failed += 1

    def held_bytes(self) -> int:
        return sum(t.received_bytes for t in self._transfers.values() if t.state != "failed")

    def __len__(self) -> int:
        return len(self._transfers)


def _where(chunk: Chunk) -> str:
    layers = f"layer {chunk.layer}" if chunk.num_layers == 1 else f"layers {chunk.layer}+{chunk.num_layers}"
    return f"transfer {chunk.transfer_id!r} {layers} blocks {chunk.first_block}+{chunk.num_blocks}"


def _error(transfer_id: str, text: str) -> ProtocolError:
    exc = ProtocolError(text)
    exc.transfer_id = transfer_id  # type: ignore[attr-defined]
    return exc
