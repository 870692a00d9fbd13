"""Property tests: damaged frame streams are refused, never crash, never complete wrongly.

The oracle: after any stream of frames, a transfer the assembler calls
complete carries exactly the bytes that were sent (so a cache written from it
is right); every targeted corruption leaves the transfer failed, answered
with an error Ack, and holding no bytes (so nothing reaches the cache).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer import codec
from kvtransfer.assembler import Assembler
from kvtransfer.framing import coalesce, transfer_messages
from kvtransfer.protocol import Limits, decode_header

DATA = torch.randn(3, 4, 2, 4, 8, generator=torch.Generator().manual_seed(1))  # layers, blocks, block
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Layers per Chunk message: 1 as long prompts send them, 2 and 3 packed as the
# send path packs short prompts' layers (their payloads back to back in one frame).
PACKINGS = (1, 2, 3)
# And each as the send path sends them (coalesced: Begin in the first message, End in the last) or
# every protocol message in a ZeroMQ message of its own.
packings = st.tuples(st.sampled_from(PACKINGS), st.booleans())


def fresh_messages(encoding="raw", checksum="xxh3", layers_per_chunk=1):
    if isinstance(layers_per_chunk, tuple):
        layers_per_chunk, coalesced = layers_per_chunk
    else:
        coalesced = False
    messages = transfer_messages("t1", DATA, blocks_per_chunk=2, encoding=encoding, checksum=checksum, layers_per_chunk=layers_per_chunk)
    messages = [[bytes(f) for f in m] for m in messages]
    return coalesce(messages) if coalesced else messages


def _coalesced(messages) -> bool:
    return len(messages[0]) > 1  # a lone Begin is one frame


def pick(messages, i: int, j: int = 0, spare_last: bool = False) -> tuple[int, int]:
    """(message, payload frame) indexes of a chunk's payload, from any two integers
    (spare_last: never the message that carries End)."""
    if not _coalesced(messages):
        index = 1 + i % (len(messages) - 2)  # chunks sit between Begin and End
        return index, 1 + j % (len(messages[index]) - 1)
    index = i % (len(messages) - 1 if spare_last and len(messages) > 1 else len(messages))
    first = 2 if index == 0 else 1  # after Begin and the chunk's header
    count = len(messages[index]) - first - (1 if index == len(messages) - 1 else 0)
    return index, first + j % count


def test_packed_messages_carry_several_layers_in_one_payload_frame():
    messages = fresh_messages(layers_per_chunk=2)[1:-1]
    assert [len(m) for m in messages] == [2, 2, 2, 2]  # header and one payload frame each
    layers = [decode_header(m[0], Limits()).num_layers for m in messages]
    assert layers == [2, 1, 2, 1]  # layers 0-1 and 2 of each of the two block ranges
    layer_bytes = DATA[0, :2].numel() * DATA.element_size()
    assert [len(m[1]) for m in messages] == [2 * layer_bytes, layer_bytes] * 2
    coalesced = fresh_messages(layers_per_chunk=(2, True))
    assert [len(m) for m in coalesced] == [3, 2, 2, 3]  # Begin joins the first, End the last


@settings(deadline=None)
@given(packing=packings)
def test_a_coalesced_transfer_completes_exactly(packing):
    a, acks = run(fresh_messages(layers_per_chunk=packing))
    assert [ack.ok for ack in acks] == [True]
    assert assert_exact_if_complete(a) == "complete"


def test_a_message_carrying_two_transfers_is_refused_and_fails_the_first():
    one = coalesce([[bytes(f) for f in m] for m in transfer_messages("t1", DATA, blocks_per_chunk=4)])
    two = coalesce([[bytes(f) for f in m] for m in transfer_messages("t2", DATA, blocks_per_chunk=4)])
    a, acks = run([one[0] + two[0]])
    assert [ack.ok for ack in acks] == [False] and "another transfer" in acks[0].error
    assert a.claim("t1").state == "failed" and a.held_bytes() == 0


def run(messages, limits=Limits()):
    clock = [0.0]
    a = Assembler(limits, transfer_timeout_s=10, lease_s=20, reclaim_s=5, clock=lambda: clock[0])
    a.test_clock = clock
    acks = []
    for frames in messages:
        ack = a.on_frames(frames)  # must never raise
        if ack is not None:
            acks.append(ack)
    return a, acks


def assert_exact_if_complete(a: Assembler) -> str:
    claim = a.claim("t1")
    if claim.state == "complete":
        out = torch.empty_like(DATA)
        for c in claim.transfer.chunks:
            h = c.header
            out[h.layer, h.first_block : h.first_block + h.num_blocks] = codec.decode(c.payload, h.encoding, h.dtype, h.shape)
        assert torch.equal(out, DATA)
    else:
        assert claim.transfer is None
    # Past every deadline (e.g. a Begin that arrived last reserves until it times
    # out; a claimed transfer keeps its bytes for the reclaim window) nothing is held.
    a.test_clock[0] += 100
    a.expire()
    a.test_clock[0] += 100
    a.expire()
    assert a.held_bytes() == 0 and a.reserved_bytes == 0
    return claim.state


def assert_refused(a: Assembler, acks) -> None:
    assert any(not ack.ok and ack.error for ack in acks), acks
    assert not any(ack.ok for ack in acks)
    assert assert_exact_if_complete(a) != "complete"


CHUNKS = range(1, len(fresh_messages()) - 1)  # message indexes of chunks (one layer each)
ANY = st.integers(0, 1000)


@FAST
@given(packing=packings, i=ANY, j=ANY, keep=st.floats(0, 0.999))
def test_truncated_payload_refused(packing, i, j, keep):
    messages = fresh_messages(layers_per_chunk=packing)
    index, frame = pick(messages, i, j)
    payload = messages[index][frame]
    messages[index][frame] = payload[: int(len(payload) * keep)]
    assert_refused(*run(messages))


@FAST
@given(packing=packings, i=ANY, j=ANY)
def test_missing_payload_frame_refused(packing, i, j):
    messages = fresh_messages(layers_per_chunk=packing)
    index, frame = pick(messages, i, j)
    del messages[index][frame]
    assert_refused(*run(messages))


@FAST
@given(packing=packings, i=ANY, j=ANY, extra=st.integers(1, 64))
def test_oversized_payload_refused(packing, i, j, extra):
    messages = fresh_messages(layers_per_chunk=packing)
    index, frame = pick(messages, i, j)
    messages[index][frame] = messages[index][frame] + b"\x00" * extra
    assert_refused(*run(messages))


def test_payload_over_limit_refused_from_header():
    assert_refused(*run(fresh_messages(), Limits(max_payload_bytes=64)))


@FAST
@given(packing=packings, i=ANY)
def test_duplicated_chunk_refused(packing, i):
    messages = fresh_messages(layers_per_chunk=packing)
    index, _ = pick(messages, i, spare_last=True)  # a copy of End's message after End only comes too late
    messages.insert(index + 1, [bytes(f) for f in messages[index]])
    a, acks = run(messages)
    if index == 0 and _coalesced(messages):
        # The copy's Begin is refused before its chunk is read; the original goes on, exact.
        assert any(not ack.ok and "duplicate Begin" in ack.error for ack in acks)
        assert_exact_if_complete(a)
        return
    assert_refused(a, acks)


@FAST
@given(packing=packings, i=ANY, dropped=st.booleans())
def test_missing_chunk_refused(packing, i, dropped):
    messages = fresh_messages(layers_per_chunk=packing)
    index, _ = pick(messages, i, spare_last=True)  # without End's message the transfer just never ends
    del messages[index]
    assert_refused(*run(messages))


@FAST
@given(packing=packings, i=ANY, j=ANY, position=st.floats(0, 0.999), bit=st.integers(0, 7))
def test_corrupted_payload_refused(packing, i, j, position, bit):
    messages = fresh_messages(layers_per_chunk=packing)
    index, frame = pick(messages, i, j)
    payload = bytearray(messages[index][frame])
    payload[int(len(payload) * position)] ^= 1 << bit
    messages[index][frame] = bytes(payload)
    assert_refused(*run(messages))


@FAST
@given(packing=packings, i=ANY, position=st.floats(0, 0.999), bit=st.integers(0, 7))
def test_corrupted_header_never_completes_wrongly(packing, i, position, bit):
    messages = fresh_messages(layers_per_chunk=packing)
    index = i % len(messages)
    header = bytearray(messages[index][0])
    header[int(len(header) * position)] ^= 1 << bit
    messages[index][0] = bytes(header)
    a, acks = run(messages)
    state = assert_exact_if_complete(a)
    if state != "complete":
        # Refused with a reason, unless the flip turned the message into one for
        # another transfer id (then t1 simply never completes).
        assert any(not ack.ok for ack in acks) or state == "pending"


@FAST
@given(packing=packings, data=st.data())
def test_reordered_stream_never_completes_wrongly(packing, data):
    messages = fresh_messages(layers_per_chunk=packing)
    order = data.draw(st.permutations(range(len(messages))))
    shuffled = [messages[i] for i in order]
    a, acks = run(shuffled)
    state = assert_exact_if_complete(a)
    in_order = order[0] == 0 and order[-1] == len(order) - 1
    assert state == ("complete" if in_order else "failed") or (not in_order and state == "pending")


@FAST
@given(frames=st.lists(st.binary(max_size=300), max_size=4))
def test_garbage_frames_refused(frames):
    a, acks = run([frames])
    assert all(not ack.ok for ack in acks)
    assert len(a) == 0 or a.claim("t1").state != "complete"


@FAST
@given(
    encoding=st.sampled_from(["raw", "int8"]),
    checksum=st.sampled_from(["xxh3", "blake3", "crc32"]),
    packing=packings,
    i=ANY,
    j=ANY,
    position=st.floats(0, 0.999),
)
def test_corruption_refused_for_every_encoding_and_checksum(encoding, checksum, packing, i, j, position):
    messages = fresh_messages(encoding, checksum, packing)
    index, frame = pick(messages, i, j)
    payload = bytearray(messages[index][frame])
    payload[int(len(payload) * position)] ^= 0x10
    messages[index][frame] = bytes(payload)
    assert_refused(*run(messages))


def test_pipeline_part_completes_with_its_own_layer_numbers():
    # A pipeline stage's part: the model's layers 5..7, numbered as the model numbers them.
    messages = [[bytes(f) for f in m] for m in transfer_messages("t1", DATA, blocks_per_chunk=2, first_layer=5)]
    a, acks = run(messages)
    assert [ack.ok for ack in acks] == [True]
    claim = a.claim("t1")
    assert claim.state == "complete"
    assert sorted({c.header.layer for c in claim.transfer.chunks}) == [5, 6, 7]


@FAST
@given(index=st.sampled_from(CHUNKS), layer=st.sampled_from([0, 4, 8, 9, 1000]))
def test_chunk_outside_the_parts_layers_refused(index, layer):
    # Chunks relabelled to a layer the part's Begin did not declare (5..7): a
    # wrong stage's KV must never fill this part, even with a valid checksum.
    from kvtransfer.framing import chunk_message
    from kvtransfer.protocol import decode_header

    messages = [[bytes(f) for f in m] for m in transfer_messages("t1", DATA, blocks_per_chunk=2, first_layer=5)]
    header = decode_header(messages[index][0], Limits())
    blocks = codec.decode(messages[index][1], header.encoding, header.dtype, header.shape)
    messages[index] = [bytes(f) for f in chunk_message("t1", layer, header.first_block, blocks, checksum=header.checksum_kind)]
    a, acks = run(messages)
    assert any("outside layers 5..7" in ack.error for ack in acks), acks
    assert_refused(a, acks)
