"""Protocol, codec and assembler unit tests: no engines, no sockets."""

from __future__ import annotations

import msgspec
import pytest
import torch

from kvtransfer import codec, protocol
from kvtransfer.assembler import Assembler
from kvtransfer.framing import begin_message, drop_message, end_message, layer_chunks, transfer_messages
from kvtransfer.handoff import decode_params_from, prefill_params, prompt_hash
from kvtransfer.options import ConnectorOptions, connector_config
from common.wire import ProtocolError
from kvtransfer.protocol import Ack, Begin, Chunk, End, Limits


def kv(layers=2, blocks=3, shape=(2, 4, 8), seed=0) -> torch.Tensor:
    return torch.randn(layers, blocks, *shape, generator=torch.Generator().manual_seed(seed))


def feed(assembler: Assembler, messages) -> list[Ack]:
    acks = []
    for frames in messages:
        ack = assembler.on_frames(frames)
        if ack is not None:
            acks.append(ack)
    return acks


def reassemble(transfer) -> torch.Tensor:
    begin = transfer.begin
    out = torch.empty(begin.num_layers, begin.num_blocks, *begin.block_shape)
    for chunk in transfer.chunks:
        h = chunk.header
        out[h.layer, h.first_block : h.first_block + h.num_blocks] = codec.decode(chunk.payload, h.encoding, h.dtype, h.shape)
    return out


def test_header_type_tag_and_version_come_first():
    raw = protocol.encode(End(protocol.PROTOCOL_VERSION, "t1", 3, 99))
    assert msgspec.msgpack.decode(raw)[:2] == ["end", protocol.PROTOCOL_VERSION]
    # DropTransfer is the class name only: on the wire it is still "abort"; the
    # version is 6 since a packed Chunk's layers share one payload frame.
    drop = protocol.encode(protocol.DropTransfer(protocol.PROTOCOL_VERSION, "t1", "why"))
    assert msgspec.msgpack.decode(drop) == ["abort", 6, "t1", "why"]


V = protocol.PROTOCOL_VERSION


def test_round_trip_every_message():
    limits = Limits()
    messages = [
        Begin(V, "t", "r", "h", 10, 2, 1, "float32", (2, 4), "raw", 64),
        Begin(V, "t", "r", "h", 10, 2, 1, "float32", (2, 4), "raw", 64, 30),
        Chunk(V, "t", 0, 0, 1, "float32", (1, 2, 4), "raw", 32, "crc32", 5),
        End(V, "t", 2, 64),
        protocol.DropTransfer(V, "t", "why"),
        Ack(V, "t", False, "bad"),
    ]
    for m in messages:
        assert protocol.decode_header(protocol.encode(m), limits) == m


@pytest.mark.parametrize(
    "message, field",
    [
        (End(V + 1, "t", 1, 1), "version"),
        (End(V, "", 1, 1), "transfer_id"),
        (Begin(V, "t", "r", "h", 10, 2, 1, "complex64", (2, 4), "raw", 64), "dtype"),
        (Begin(V, "t", "r", "h", 10, 2, 1, "float32", (2, 4), "zstd", 64), "encoding"),
        (Begin(V, "t", "r", "h", 10, 2, 1, "float32", (2, 4), "raw", 65), "reserve_bytes"),
        (Begin(V, "t", "r", "h", 10, 2, 1, "float32", (2, 4), "raw", 64, -1), "first_layer"),
        (Begin(V, "t", "r", "h", 10, 2, 1, "float32", (2, 4), "raw", 64, 1023), "first_layer"),
        (Chunk(V, "t", 0, 0, 1, "float32", (1, 2, 4), "raw", 31, "crc32", 5), "payload_bytes"),
        (Chunk(V, "t", 0, 0, 2, "float32", (1, 2, 4), "raw", 32, "crc32", 5), "shape"),
    ],
)
def test_invalid_fields_are_named(message, field):
    with pytest.raises(ProtocolError, match=field):
        protocol.decode_header(protocol.encode(message), Limits())


def test_oversized_header_refused_before_decoding():
    with pytest.raises(ProtocolError, match="max_header_bytes"):
        protocol.decode_header(b"\x00" * 5000, Limits())


def test_oversized_payload_refused_by_header():
    limits = Limits(max_payload_bytes=16)
    with pytest.raises(ProtocolError, match="max_payload_bytes"):
        protocol.decode_header(protocol.encode(Chunk(V, "t", 0, 0, 1, "float32", (1, 2, 4), "raw", 32, "crc32", 5)), limits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_codec_is_exact_and_zero_copy(dtype):
    t = torch.randn(3, 2, 4, 8).to(dtype)
    payload = codec.as_bytes(t)
    assert payload.obj is not None and len(payload) == t.numel() * t.element_size()
    back = codec.decode(payload, "raw", codec.dtype_name(dtype), tuple(t.shape))
    assert torch.equal(back, t)
    assert back.data_ptr() == t.data_ptr()  # a view of the same memory: no copy


def test_int8_codec_error_is_small_and_payload_smaller():
    t = torch.randn(3, 2, 16, 64)
    parts = codec.encode(t, "int8")
    payload = b"".join(bytes(codec.as_bytes(p)) for p in parts)
    assert len(payload) == protocol.payload_bytes("int8", "float32", tuple(t.shape)) < t.numel() * 4 / 3
    back = codec.decode(payload, "int8", "float32", tuple(t.shape))
    rel = (back - t).abs().max() / t.abs().max()
    assert rel < 0.01


def test_assembler_completes_and_reassembles_exactly():
    data = kv()
    now = [0.0]
    a = Assembler(reclaim_s=2, clock=lambda: now[0])
    acks = feed(a, transfer_messages("t1", data, blocks_per_chunk=2))
    assert [x.ok for x in acks] == [True]
    claim = a.claim("t1")
    assert claim.state == "complete"
    assert torch.equal(reassemble(claim.transfer), data)
    assert a.claim("t1").state == "complete"  # a sibling (n > 1) admitted a step later
    assert a.held_bytes() > 0
    a.release("t1")  # the worker ends the window early
    assert a.reserved_bytes == 0 and a.held_bytes() == 0
    again = a.claim("t1")  # a late duplicate must not wait for KV that is gone
    assert again.state == "failed" and "already claimed" in again.error


def test_reclaim_window_also_ends_by_itself():
    now = [0.0]
    a = Assembler(reclaim_s=2, clock=lambda: now[0])
    feed(a, transfer_messages("t1", kv()))
    assert a.claim("t1").state == "complete"
    now[0] = 3.0
    a.expire()
    assert a.held_bytes() == 0 and a.reserved_bytes == 0 and a.claim("t1").state == "failed"


def test_claim_before_arrival_is_pending_and_lease_expiry_frees():
    now = [0.0]
    a = Assembler(lease_s=5, clock=lambda: now[0])
    assert a.claim("t1").state == "pending"
    feed(a, transfer_messages("t1", kv()))
    assert a.reserved_bytes > 0
    now[0] = 6.0
    assert a.expire() == ["t1"]
    assert a.counters.lease_expiries == 1 and a.reserved_bytes == 0 and a.claim("t1").state == "pending"


def test_transfer_timeout_fails_partial_transfer():
    now = [0.0]
    a = Assembler(transfer_timeout_s=2, lease_s=5, clock=lambda: now[0])
    feed(a, transfer_messages("t1", kv())[:-1])  # no End: the sender died
    now[0] = 3.0
    a.expire()
    claim = a.claim("t1")
    assert claim.state == "failed" and "timed out" in claim.error
    assert a.reserved_bytes == 0


def test_buffer_limit_refuses_begin_before_any_payload():
    data = kv()
    a = Assembler(max_buffer_bytes=data.numel() * 4 - 1)
    acks = feed(a, transfer_messages("t1", data))
    assert acks and not acks[0].ok and "buffer full" in acks[0].error
    assert a.claim("t1").state == "failed" and a.held_bytes() == 0


def test_expected_layout_mismatch_refused():
    a = Assembler(expected=lambda begin: "wrong model" if begin.num_layers != 4 else None)
    acks = feed(a, transfer_messages("t1", kv(layers=2)))
    assert not acks[0].ok and "wrong model" in acks[0].error
    assert a.claim("t1").state == "failed"


def test_abort_drops_received_bytes():
    a = Assembler()
    messages = transfer_messages("t1", kv())
    feed(a, messages[:2])
    assert a.held_bytes() > 0
    a.on_frames(drop_message("t1", "prefill died"))
    assert a.held_bytes() == 0 and a.reserved_bytes == 0
    assert "prefill died" in a.claim("t1").error


def test_handoff_contract():
    config = connector_config("consumer", listen_endpoint="tcp://127.0.0.1:5999", lease_s=3)
    assert config["kv_connector"] == "HexKVConnector" and config["kv_connector_module_path"] == "kvtransfer.connector"
    assert config["kv_role"] == "kv_consumer" and config["kv_load_failure_policy"] == "recompute"
    assert ConnectorOptions.from_extra_config(config["kv_connector_extra_config"]).lease_s == 3
    with pytest.raises(ValueError, match="listen_endpoint"):
        connector_config("consumer")
    with pytest.raises(ValueError, match="unknown kvtransfer options"):
        ConnectorOptions.from_extra_config({"lease": 3})
    with pytest.raises(ValueError, match="tcp://"):
        prefill_params("localhost:5999")
    p = prefill_params("ipc:///tmp/x")
    assert p["do_remote_decode"] and p["transfer_id"]
    assert decode_params_from(None) is None
    assert decode_params_from({"do_remote_prefill": True, "transfer_id": "x"})["transfer_id"] == "x"
    assert prompt_hash([1, 2, 3]) != prompt_hash([1, 2, 4])


def test_the_message_builder_pieces_make_a_transfer_the_assembler_accepts():
    """Begin, each layer's chunks and End as the send path builds them: chunks
    at most max_chunk_bytes (views, no copy), reserve_bytes the raw size."""
    data = kv(layers=2, blocks=5, shape=(2, 4))  # float32: 32 bytes a block
    begin = begin_message("t1", "r1", prompt_hash="h", num_tokens=9, first_layer=0, num_layers=2, num_blocks=5,
                          dtype="float32", block_shape=(2, 4))
    assert protocol.decode_header(begin[0], Limits()).reserve_bytes == data.numel() * 4
    chunks = [frames for layer in range(2) for frames in layer_chunks("t1", layer, 0, data[layer], max_chunk_bytes=64)]
    headers = [protocol.decode_header(frames[0], Limits()) for frames in chunks]
    assert [(h.layer, h.first_block, h.num_blocks) for h in headers] == [(0, 0, 2), (0, 2, 2), (0, 4, 1), (1, 0, 2), (1, 2, 2), (1, 4, 1)]
    blocks = data[0].clone()
    first = next(layer_chunks("v", 0, 0, blocks, max_chunk_bytes=64))
    blocks[0].fill_(7.0)  # the payload is a view of the blocks' memory, not a copy
    assert codec.from_bytes(first[1], "float32", (2, 2, 4))[0].eq(7.0).all()
    total = sum(len(frames[1]) for frames in chunks)
    a = Assembler()
    acks = feed(a, [begin, *chunks, end_message("t1", len(chunks), total)])
    assert [x.ok for x in acks] == [True] and torch.equal(reassemble(a.claim("t1").transfer), data)


@pytest.mark.parametrize("kind", ["xxh3", "blake3", "crc32"])
def test_checksum_of_several_payloads_is_that_of_their_bytes_joined(kind):
    # A checksum of several frames is that of their bytes joined (a packed Chunk's layers share one frame).
    parts = [bytes(range(256)) * 3, b"", b"abc" * 1000]
    assert protocol.checksum(kind, parts) == protocol.checksum(kind, [b"".join(parts)])
    assert protocol.checksum(kind, parts) != protocol.checksum(kind, [b"".join(reversed(parts))])


@pytest.mark.parametrize(
    "endpoint, expected",
    [
        ("ipc:///tmp/decode.sock", "none"),  # Unix socket: both ends on this host
        ("tcp://127.0.0.1:7100", "none"),
        ("tcp://127.3.0.9:7100", "none"),
        ("tcp://localhost:7100", "none"),
        ("tcp://[::1]:7100", "none"),
        ("tcp://10.0.0.5:7100", "xxh3"),  # another host (or this one's own address: counted remote)
        ("tcp://[fd00::5]:7100", "xxh3"),
        ("tcp://decode-3.cluster:7100", "xxh3"),  # a name is not resolved: remote
    ],
)
def test_auto_checksum_only_on_links_that_leave_the_host(endpoint, expected):
    from kvtransfer.options import link_checksum

    assert ConnectorOptions().checksum == "auto"
    assert link_checksum("auto", endpoint) == expected
    assert link_checksum("blake3", endpoint) == "blake3"  # an explicit choice holds on every link
    with pytest.raises(ValueError, match="checksum"):
        ConnectorOptions(checksum="md5")
