import msgspec
import pytest

from common.roles import Role
from common.wire import ProtocolError
from engine import control_protocol as proto


def _submit(**overrides):
    values = dict(version=proto.PROTOCOL_VERSION, request_id="r1", prompt_token_ids=[1, 2, 3],
                  sampling=proto.SamplingSpec(max_tokens=4, stop=["\n"]), kv_transfer_params={"a": 1})
    values.update(overrides)
    return proto.Submit(**values)


@pytest.mark.parametrize("message", [
    _submit(),
    proto.Abort(version=proto.PROTOCOL_VERSION, request_id="r1"),
    proto.Ping(version=proto.PROTOCOL_VERSION, nonce=7),
    proto.Pong(version=proto.PROTOCOL_VERSION, nonce=7, load=proto.LoadReport(worker_id="w", role=Role.DECODE, num_running=2)),
    proto.Output(version=proto.PROTOCOL_VERSION, request_id="r1", token_ids=[5], text="x", finished=True, finish_reason="stop"),
])
def test_round_trip(message):
    frames = proto.encode(message)
    assert frames[0] == proto._TAGS[type(message)].value
    assert proto.decode(frames) == message


def test_unknown_tag_refused():
    with pytest.raises(ProtocolError, match="unknown message type"):
        proto.decode([b"Z", b""])


def test_wrong_frame_count_refused():
    with pytest.raises(ProtocolError, match="2 frames"):
        proto.decode([b"S"])


def test_oversized_body_refused_before_decoding():
    with pytest.raises(ProtocolError, match="exceeds"):
        proto.decode([b"S", b"\x00" * (proto.MAX_BODY_BYTES + 1)])


def test_other_version_refused():
    frames = proto.encode(_submit(version=proto.PROTOCOL_VERSION + 1))
    with pytest.raises(ProtocolError, match="protocol version"):
        proto.decode(frames)


def test_malformed_body_names_the_problem():
    body = msgspec.msgpack.encode([proto.PROTOCOL_VERSION, "r1", "not a list", [4]])
    with pytest.raises(ProtocolError, match="malformed SUBMIT"):
        proto.decode([b"S", body])
    assert proto.request_id_of([b"S", body]) == "r1"


@pytest.mark.parametrize("bad, match", [
    (dict(prompt_token_ids=[]), "at least one prompt token"),
    (dict(request_id=""), "request_id is empty"),
    (dict(sampling=proto.SamplingSpec(max_tokens=0)), "max_tokens"),
])
def test_invalid_submit_refused(bad, match):
    with pytest.raises(ProtocolError, match=match):
        proto.decode(proto.encode(_submit(**bad)))
