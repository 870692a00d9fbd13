"""Sender and receiver over real ZeroMQ sockets (no engines): delivery, refusal, flow control."""

from __future__ import annotations

import torch
import zmq

from kvtransfer.assembler import Assembler
from kvtransfer.framing import transfer_messages
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.sockets import socket
from kvtransfer.stats import Stats, read_stats


def submit_all(sender: KVSender, endpoint: str, transfer_id: str, messages) -> list[bool]:
    results = []
    for i, frames in enumerate(messages):
        nbytes = len(frames[1]) if len(frames) > 1 else 0
        results.append(sender.submit(endpoint, transfer_id, frames, nbytes, is_end=i == len(messages) - 1))
    return results


def test_round_trip_and_published_counters(tmp_path):
    endpoint = f"ipc://{tmp_path}/rx.sock"
    rx_stats, tx_stats = Stats(tmp_path / "rx.json"), Stats(tmp_path / "tx.json")
    receiver, sender = KVReceiver(endpoint, Assembler(), rx_stats), KVSender(tx_stats)
    try:
        data = torch.randn(3, 5, 2, 8, 16)
        messages = transfer_messages("t1", data, blocks_per_chunk=2)
        assert all(submit_all(sender, endpoint, "t1", messages))
        assert sender.wait_idle(10) and sender.results["t1"] == "ok"
        claim = receiver.claim("t1")
        assert claim.state == "complete" and len(claim.transfer.chunks) == 9
    finally:
        sender.close()
        receiver.close()
    sent, received = read_stats(tmp_path / "tx.json"), read_stats(tmp_path / "rx.json")
    assert sent["transfers_sent_ok"] == 1 and sent["bytes_sent"] == received["bytes_received"] == data.numel() * 4


def test_refusal_reaches_the_sender(tmp_path):
    endpoint = f"ipc://{tmp_path}/rx.sock"
    receiver = KVReceiver(endpoint, Assembler(max_buffer_bytes=1000), Stats())
    sender = KVSender(Stats(), ack_timeout_s=10)
    try:
        submit_all(sender, endpoint, "big", transfer_messages("big", torch.randn(2, 4, 2, 8, 16)))
        assert sender.wait_idle(10)
        assert "buffer full" in sender.results["big"]
        assert sender.stats.snapshot()["transfers_sent_failed"] == 1
        assert receiver.claim("big").state == "failed"
    finally:
        sender.close()
        receiver.close()


def test_no_decode_listening_fails_the_transfer_instead_of_queueing(tmp_path):
    sender = KVSender(Stats(), send_timeout_ms=200)
    try:
        messages = transfer_messages("t1", torch.randn(2, 2, 2, 8, 16))
        submit_all(sender, f"ipc://{tmp_path}/nobody.sock", "t1", messages)
        assert sender.wait_idle(10)
        assert "failed" in sender.results["t1"] and sender.is_failed("t1")
        assert not sender.submit(f"ipc://{tmp_path}/nobody.sock", "t1", messages[1], 1)
    finally:
        sender.close()


def test_slow_decode_bounds_prefill_memory(tmp_path):
    """A decode peer that never reads: the sender's queue stays bounded and the transfer fails."""
    endpoint = f"ipc://{tmp_path}/stuck.sock"
    max_queued = 1 << 20
    ctx = zmq.Context.instance()
    with socket(ctx, zmq.ROUTER, endpoint, bind=True, hwm_messages=1):  # bound, never read
        sender = KVSender(Stats(), max_queued_bytes=max_queued, enqueue_timeout_s=0.3, send_timeout_ms=300, hwm_messages=1)
        try:
            layer = torch.randn(16, 2, 16, 8, 16)  # 256 KiB per chunk
            messages = transfer_messages("t1", layer.unsqueeze(0).expand(64, *layer.shape).contiguous())
            accepted = []
            for i, frames in enumerate(messages):
                nbytes = len(frames[1]) if len(frames) > 1 else 0
                accepted.append(sender.submit(endpoint, "t1", frames, nbytes))
                assert sender._queued_bytes <= max_queued  # what waits for the socket stays within the credit
            assert not all(accepted) and not accepted[-1]
            assert sender.wait_idle(10) and sender.is_failed("t1")
            assert sender.stats.snapshot()["transfers_sent_failed"] == 1
        finally:
            sender.close()
