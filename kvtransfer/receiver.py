"""Decode side of the transport: a ROUTER socket, one I/O thread, an Assembler.

The I/O thread owns the socket (ZeroMQ sockets are single-threaded): it
receives frames without copying them (payloads stay in ZeroMQ's buffers until
they are copied once, into the paged KV cache), feeds them to the Assembler,
answers each finished or refused transfer with an Ack, and expires leases.
The engine's thread only calls `claim`/`forget`, under the lock.

Flow control: the receive high-water mark (64 messages) bounds what ZeroMQ
queues before this thread looks at it; past that, TCP backpressure stalls
the sender. Begin's reservation against `max_buffer_bytes` bounds the rest.

Memory: a receiver holds whole transfers and frees them in bulk, so by default
it asks glibc to keep freed frames for reuse (kvtransfer.allocator) instead of
faulting fresh pages in for every transfer.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from kvtransfer import protocol
from kvtransfer.allocator import keep_freed_memory
from kvtransfer.arrivals import ArrivalMarks
from kvtransfer.assembler import Assembler, Claim
from common.sockets import make_socket
from kvtransfer.stats import Stats

logger = logging.getLogger(__name__)

EXPIRY_INTERVAL_S = 0.02


class KVReceiver:
    def __init__(
        self, endpoint: str, assembler: Assembler, stats: Stats, *, hwm_messages: int = 64, reuse_freed_memory: bool = True
    ) -> None:
        if reuse_freed_memory:
            keep_freed_memory(assembler.max_buffer_bytes)
        self.endpoint = endpoint
        self.assembler = assembler
        self.stats = stats
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._bind_error: Exception | None = None
        # Our own context: its I/O thread (which allocates every frame) starts
        # after keep_freed_memory, so it allocates from the main arena.
        self._ctx = zmq.Context()
        self._hwm = hwm_messages
        self._reported = dict(bytes_received=0, transfers_received_failed=0, frames_refused=0, lease_expiries=0, internal_errors=0)
        # Complete, unclaimed transfers, visible to the scheduler (kvtransfer.arrivals).
        self.marks = ArrivalMarks(endpoint)
        self._thread = threading.Thread(target=self._run, name="kvtransfer-recv", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._bind_error is not None:
            raise self._bind_error

    def claim(self, transfer_id: str) -> Claim:
        with self._lock:
            return self.assembler.claim(transfer_id)

    def release(self, transfer_id: str) -> None:
        with self._lock:
            self.assembler.release(transfer_id)
            self.marks.unmark(transfer_id)

    def forget(self, transfer_id: str, error: str) -> None:
        with self._lock:
            self.assembler.forget(transfer_id, error)
            self.marks.unmark(transfer_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            self.marks.clear()
        if not self._thread.is_alive():
            self._ctx.term()

    def _run(self) -> None:
        try:
            sock = make_socket(
                self._ctx,
                zmq.ROUTER,
                self.endpoint,
                bind=True,
                hwm_messages=self._hwm,
                max_message_bytes=self.assembler.limits.max_frame_bytes,
            )
        except Exception as exc:  # surfaced to the constructor
            self._bind_error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_expiry_s = 0.0
        try:
            while not self._stop.is_set():
                if poller.poll(100):
                    self._drain(sock)
                # Leases and timeouts are seconds long: checking them between
                # every two messages only costs throughput on small chunks.
                if (now := time.monotonic()) >= next_expiry_s:
                    with self._lock:
                        for transfer_id in self.assembler.expire():
                            self.marks.unmark(transfer_id)
                    next_expiry_s = now + EXPIRY_INTERVAL_S
                # Counters right away (the file itself is rewritten at most every
                # 0.2 s): a refusal is counted before decode can act on it.
                self._publish()
        finally:
            sock.close(linger=0)
            self._publish(force=True)

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(256):  # bounded so expiry and stats still run under load
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, body = frames[0].bytes, [f.buffer for f in frames[1:]]
            with self._lock:
                ack = self.assembler.on_frames(body)
                if ack is not None and ack.ok:
                    self.marks.mark(ack.transfer_id)
            if ack is not None:
                if not ack.ok:
                    logger.warning("kvtransfer: refused %s: %s", ack.transfer_id, ack.error)
                try:
                    sock.send_multipart([identity, protocol.encode(ack)], flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the sender is gone or slow; it times out waiting for the Ack

    def _publish(self, force: bool = False) -> None:
        counters = self.assembler.counters
        current = dict(
            bytes_received=counters.bytes_received,
            transfers_received_failed=counters.transfers_failed,
            frames_refused=counters.frames_refused,
            lease_expiries=counters.lease_expiries,
            internal_errors=counters.internal_errors,
        )
        for name, value in current.items():
            if value != self._reported[name]:
                self.stats.add(name, value - self._reported[name])
                self._reported[name] = value
        self.stats.flush(force)
