"""Prefill side of the transport: a bounded send queue drained by one I/O thread.

The engine's thread calls `submit` with frames that reference tensor memory
(no copy); the I/O thread owns one DEALER socket per decode endpoint and
hands the frames to ZeroMQ. Two layers of flow control keep a slow or dead
decode worker from making prefill exhaust memory:

- credits: at most `max_queued_bytes` wait in our queue; `submit` blocks up to
  `enqueue_timeout_s` for room, then fails that transfer (decode recomputes);
- ZeroMQ's high-water mark bounds what sits in the socket, and a send that
  cannot proceed within `send_timeout_ms` fails the transfer.

A transfer counts as sent only when the receiver Acks it within `ack_timeout_s`.

Memory: the send path gathers every chunk into new memory, which this queue
holds until ZeroMQ sent it (at most `max_queued_bytes` plus what the socket
holds). By default the sender asks glibc to keep freed memory for reuse
(kvtransfer.allocator), as the receiver does: otherwise every gather of a
long prompt faults fresh pages in (measured in benchmarks/kvtransfer_throughput).
Transfers are tracked per (endpoint, transfer_id): one prefill rank may send
parts with the same id to several decode ranks (each its own endpoint), and
each part is acked, counted and failed on its own.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass

import zmq

from kvtransfer import protocol
from kvtransfer.allocator import keep_freed_memory
from common.wire import ProtocolError
from kvtransfer.framing import drop_message
from kvtransfer.protocol import Ack, Limits
from common.sockets import make_socket
from kvtransfer.stats import Stats

logger = logging.getLogger(__name__)

# How often the I/O thread looks for Acks that are overdue (timeouts are seconds).
EXPIRY_INTERVAL_S = 0.02
# How long the I/O thread waits in one poll for Acks when nothing is queued (a submit wakes it).
ACK_POLL_MS = 5


@dataclass(slots=True)
class _Item:
    endpoint: str
    transfer_id: str
    frames: list
    nbytes: int
    is_end: bool
    is_drop: bool = False  # sent even though the transfer failed: it tells decode so


class KVSender:
    def __init__(
        self,
        stats: Stats,
        *,
        max_queued_bytes: int = 256 * 1024 * 1024,
        enqueue_timeout_s: float = 10.0,
        send_timeout_ms: int = 5000,
        ack_timeout_s: float = 30.0,
        hwm_messages: int = 64,
        reuse_freed_memory: bool = True,
    ) -> None:
        if reuse_freed_memory:
            keep_freed_memory(max_queued_bytes)
        self.stats = stats
        self.max_queued_bytes = max_queued_bytes
        self.enqueue_timeout_s = enqueue_timeout_s
        self.send_timeout_ms = send_timeout_ms
        self.ack_timeout_s = ack_timeout_s
        self._hwm = hwm_messages
        self._ctx = zmq.Context.instance()
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_bytes = 0
        self._in_flight = 0  # popped from the queue, not yet handed to ZeroMQ
        self._cond = threading.Condition()
        # Keyed by (endpoint, transfer_id), see the module docstring.
        self._failed: dict[tuple[str, str], float] = {}  # -> when (pruned after a while)
        self._awaiting_ack: dict[tuple[str, str], float] = {}  # -> deadline
        self._open: set[tuple[str, str]] = set()  # submitted, neither acked nor failed: the only ones an Ack may settle
        self.results: dict[tuple[str, str], str] = {}  # -> "ok" | error, for tests/benchmarks
        self._stop = False
        # Wakes the I/O thread out of its poll for Acks when a message is queued: without it a
        # message submitted while any transfer awaited its Ack waited for the poll's timeout
        # (5 ms; measured 2.9 ms median, 5.9 ms worst, per message under concurrent transfers).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._polling = False  # the I/O thread is (about to be) in its poll: submit writes to the pipe
        self.ack_poll_ms = ACK_POLL_MS
        self._thread = threading.Thread(target=self._run, name="kvtransfer-send", daemon=True)
        self._thread.start()

    # -- engine thread ---------------------------------------------------------------------

    def submit(self, endpoint: str, transfer_id: str, frames: list, nbytes: int, *, is_end: bool = False) -> bool:
        """Queue one message. False if the transfer has failed (the caller stops sending it)."""
        deadline = time.monotonic() + self.enqueue_timeout_s
        key = (endpoint, transfer_id)
        with self._cond:
            while True:
                if key in self._failed:
                    return False
                # Bytes count until the socket took them; a single message larger
                # than the credit still goes, alone.
                if self._queued_bytes == 0 or self._queued_bytes + nbytes <= self.max_queued_bytes:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._mark_failed(key, f"send queue full for {self.enqueue_timeout_s}s (decode too slow)")
                    self._queue.append(self._drop_item(endpoint, transfer_id, "sender queue full"))
                    self._cond.notify_all()
                    return False
                self._cond.wait(remaining)
            self._queue.append(_Item(endpoint, transfer_id, frames, nbytes, is_end))
            self._open.add(key)
            self._queued_bytes += nbytes
            self._wake()
        return True

    def _wake(self, always_write: bool = False) -> None:
        """Caller holds the lock: wake the I/O thread wherever it waits (the condition or its
        poll). The pipe is written only when the thread polls (or `always_write`, on close)."""
        self._cond.notify_all()
        if self._polling or always_write:
            self._polling = False
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    def is_failed(self, endpoint: str, transfer_id: str) -> bool:
        with self._cond:
            return (endpoint, transfer_id) in self._failed

    def result(self, endpoint: str, transfer_id: str) -> str | None:
        """"ok", the reason it failed, or None while it is under way (tests, benchmarks)."""
        with self._cond:
            return self.results.get((endpoint, transfer_id))

    def drop(self, endpoint: str, transfer_id: str, reason: str) -> None:
        """Fail the transfer here and tell the receiver to drop what it holds of it."""
        with self._cond:
            self._mark_failed((endpoint, transfer_id), reason)
            self._queue.append(self._drop_item(endpoint, transfer_id, reason))
            self._wake()

    @staticmethod
    def _drop_item(endpoint: str, transfer_id: str, reason: str) -> _Item:
        return _Item(endpoint, transfer_id, drop_message(transfer_id, reason), 0, is_end=False, is_drop=True)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until everything queued was sent and acked or failed (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._in_flight or self._awaiting_ack:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._wake(always_write=True)  # from a poll too
        self._thread.join(5)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- I/O thread ------------------------------------------------------------------------

    def _mark_failed(self, key: tuple[str, str], reason: str) -> None:
        """Caller holds the lock."""
        if key in self._failed:
            return
        self._open.discard(key)
        self._failed[key] = time.monotonic()
        self._awaiting_ack.pop(key, None)
        self.results[key] = reason
        self.stats.add("transfers_sent_failed")
        logger.warning("kvtransfer: transfer %s to %s failed: %s", key[1], key[0], reason)

    def _run(self) -> None:
        sockets: dict[str, zmq.Socket] = {}
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        next_expiry_s = 0.0
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                    if not self._queue and not self._awaiting_ack:
                        self._cond.wait(0.1)
                    # Everything queued at once: one lock round and one Ack poll
                    # per batch, not per message (short prompts send many small chunks).
                    batch = list(self._queue)
                    self._queue.clear()
                    self._in_flight += len(batch)
                for item in batch:
                    self._send(item, sockets, poller)
                timeout_ms = 0
                if not batch:
                    with self._cond:
                        if not self._queue and not self._stop:
                            self._polling, timeout_ms = True, self.ack_poll_ms
                self._receive_acks(sockets, poller, timeout_ms)
                if timeout_ms:
                    with self._cond:
                        self._polling = False
                if (now := time.monotonic()) >= next_expiry_s:
                    self._expire()
                    self.stats.flush()
                    next_expiry_s = now + EXPIRY_INTERVAL_S
        finally:
            for sock in sockets.values():
                sock.close(linger=0)
            self.stats.flush(force=True)

    def _socket(self, endpoint: str, sockets: dict[str, zmq.Socket], poller: zmq.Poller) -> zmq.Socket:
        sock = sockets.get(endpoint)
        if sock is None:
            sock = make_socket(
                self._ctx,
                zmq.DEALER,
                endpoint,
                bind=False,
                hwm_messages=self._hwm,
                send_timeout_ms=self.send_timeout_ms,
                immediate=True,
                max_message_bytes=Limits().max_header_bytes,  # we only receive Acks
            )
            sockets[endpoint] = sock
            poller.register(sock, zmq.POLLIN)
        return sock

    def _send(self, item: _Item, sockets: dict[str, zmq.Socket], poller: zmq.Poller) -> None:
        key = (item.endpoint, item.transfer_id)
        with self._cond:
            failed = key in self._failed and not item.is_drop
        if not failed:
            try:
                self._socket(item.endpoint, sockets, poller).send_multipart(item.frames, copy=False)
            except (zmq.Again, zmq.ZMQError, ValueError) as exc:
                with self._cond:
                    self._mark_failed(key, f"send to {item.endpoint} failed: {exc or 'timed out'}")
                failed = True
        with self._cond:
            self._in_flight -= 1
            self._queued_bytes -= item.nbytes
            if not failed:
                self.stats.add("bytes_sent", item.nbytes)
                if item.is_end:
                    self._awaiting_ack[key] = time.monotonic() + self.ack_timeout_s
            self._cond.notify_all()

    def _receive_acks(self, sockets: dict[str, zmq.Socket], poller: zmq.Poller, timeout_ms: int) -> None:
        if not sockets:
            if timeout_ms:  # nothing to hear from yet: wait for a submit (the condition, woken by _wake)
                with self._cond:
                    if not self._queue and not self._stop:
                        self._cond.wait(timeout_ms / 1e3)
            return
        endpoints = {sock: endpoint for endpoint, sock in sockets.items()}
        for sock, _ in poller.poll(timeout_ms):
            if sock == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            while True:
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    ack = protocol.decode_header(frames[-1], Limits())
                except ProtocolError as exc:
                    logger.warning("kvtransfer: bad reply from decode: %s", exc)
                    continue
                if isinstance(ack, Ack):
                    self._on_ack(endpoints[sock], ack)

    def _on_ack(self, endpoint: str, ack: Ack) -> None:
        key = (endpoint, ack.transfer_id)
        with self._cond:
            if key not in self._open:
                return  # not ours or already settled (e.g. a refusal of a garbled frame)
            if ack.ok and key in self._awaiting_ack:
                del self._awaiting_ack[key]
                self._open.discard(key)
                self.results[key] = "ok"
                self.stats.add("transfers_sent_ok")
            elif not ack.ok:
                self._mark_failed(key, f"decode refused: {ack.error}")
            self._cond.notify_all()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            for key, deadline in list(self._awaiting_ack.items()):
                if deadline <= now:
                    self._mark_failed(key, f"no Ack within ack_timeout_s={self.ack_timeout_s}")
            # Forget failures after a while so the set cannot grow without bound.
            for key, when in list(self._failed.items()):
                if now - when > 600:
                    del self._failed[key]
            if len(self.results) > 10000:
                for key in list(self.results)[:5000]:
                    del self.results[key]
            self._cond.notify_all()
