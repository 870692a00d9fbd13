import msgspec
import pytest

from common.roles import Role
from common.wire import ProtocolError
from vllm.sampling_params import SamplingParams
from engine import control_protocol as proto


def _submit(**overrides):
    values = dict(version=proto.PROTOCOL_VERSION, request_id="r1", prompt_token_ids=[1, 2, 3],
                  sampling=SamplingParams(max_tokens=4, stop=["\n"]), kv_transfer_params={"a": 1})
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
])
def test_invalid_submit_refused(bad, match):
    with pytest.raises(ProtocolError, match=match):
        proto.decode(proto.encode(_submit(**bad)))


def _with_sampling(**fields) -> list[bytes]:
    """A SUBMIT whose sampling fields were set past SamplingParams' own checks (a foreign sender)."""
    sampling = SamplingParams(max_tokens=4)
    for name, value in fields.items():
        setattr(sampling, name, value)
    return proto.encode(_submit(sampling=sampling))


@pytest.mark.parametrize("fields, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=None), "max_tokens"),
    (dict(n=2), "router fans n out"),
    (dict(temperature=-1.0), "malformed SUBMIT.*temperature"),  # vLLM's own check, on decode
])
def test_invalid_sampling_refused(fields, match):
    with pytest.raises(ProtocolError, match=match):
        proto.decode(_with_sampling(**fields))


def test_every_sampling_option_and_logprobs_cross_the_wire():
    from vllm.sampling_params import StructuredOutputsParams

    sampling = SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=1, logit_bias={7: -100.0},
                              repetition_penalty=1.2, min_p=0.1, allowed_token_ids=[1, 2, 7], bad_words=["x"],
                              structured_outputs=StructuredOutputsParams(json={"type": "object"}),
                              include_stop_str_in_output=True, skip_special_tokens=False)
    message = _submit(sampling=sampling)
    decoded = proto.decode(proto.encode(message))
    assert decoded == message and decoded.sampling.structured_outputs.json == {"type": "object"}
    output = proto.Output(version=proto.PROTOCOL_VERSION, request_id="r1", token_ids=[5],
                          logprobs=[[proto.TokenLogprob(5, -0.1, 1, "a"), proto.TokenLogprob(9, -2.5, 2, "b")]],
                          prompt_logprobs=[[], [proto.TokenLogprob(2, -1.0, 3, " c")]])
    assert proto.decode(proto.encode(output)) == output
