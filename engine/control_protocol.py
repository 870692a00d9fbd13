"""Every message between the router and a worker (prefill or decode), in one place.

Transport: ZeroMQ. Each worker binds one ROUTER socket (its control
endpoint); the router connects one DEALER per worker. A message is two frames:

    [type tag (1 byte), msgpack body]

The tag says what the body is, so a receiver can refuse an unknown or
oversized message before decoding anything. Bodies are `msgspec.Struct`s
encoded as arrays (compact, positional) whose first field is the protocol
version; a peer with another version is refused with a clear error.

Lifecycle of one request, seen from the router:

    router ──SUBMIT(prompt ids, sampling, kv_transfer_params)──▶ worker
    router ◀──OUTPUT(new token ids, text delta, logprobs, ...) × n ─ worker
    router ◀──OUTPUT(finished=True, finish_reason, kv params)─── worker
    router ──ABORT(request id)──▶ worker        (client went away)
    router ──PING(nonce)──▶ worker ──PONG(nonce, load)──▶ router   (health, every ~1 s)
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from common.roles import Role
from common.wire import ProtocolError

# 2: SUBMIT carries vLLM's own SamplingParams (every option the OpenAI layer
# can set, structured outputs and logit bias included) and OUTPUT per-token
# logprobs; 1 carried a subset of options of our own.
PROTOCOL_VERSION = 2

# Limits enforced before a body is decoded. A prompt of 128k token ids packs
# to well under 1 MiB; 8 MiB leaves room for long stop lists and kv params.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_PROMPT_TOKENS = 1_000_000

# Socket options of both ends of a control connection: deep queues (many small
# token messages), and ZeroMQ drops frames past 16 MiB before buffering them;
# bodies between MAX_BODY_BYTES and that reach decode() and are refused by name.
CONTROL_SOCKET_LIMITS = dict(hwm_messages=10_000, max_message_bytes=16 * 1024 * 1024)


class MsgType(bytes, enum.Enum):
    SUBMIT = b"S"
    ABORT = b"A"
    PING = b"P"
    OUTPUT = b"O"
    PONG = b"Q"


class Submit(msgspec.Struct, array_like=True, omit_defaults=True, forbid_unknown_fields=True):
    version: int
    request_id: str
    prompt_token_ids: list[int]
    # vLLM's type, as vLLM's own frontend sends it to its engine core (it is a
    # msgspec Struct): one home for what sampling means. The worker owns
    # output_kind and the kv params; n > 1 is fanned out by the router.
    sampling: SamplingParams
    kv_transfer_params: dict[str, Any] | None = None


class Abort(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    request_id: str


class Ping(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    nonce: int


class LoadReport(msgspec.Struct, array_like=True, omit_defaults=True):
    """What a worker tells the router about its load at each health check."""

    worker_id: str
    role: Role
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the paged KV cache in use, 0..1
    num_inflight: int = 0  # requests this worker's control loop holds
    kv_stats: dict[str, float] = {}  # transfer counters from the KV connector
    # The engine's own prefix-cache counts since it started (vLLM's scheduler
    # stats): prompt tokens looked up, and of those found in the cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Pong(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    nonce: int
    load: LoadReport


class TokenLogprob(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One candidate token at one position, as vLLM's `Logprob` (rank 1: the most likely)."""

    token_id: int
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One list per position: vLLM's order, the sampled (or prompt) token first, then the top ones.
PositionLogprobs = list[TokenLogprob]


class Output(msgspec.Struct, array_like=True, omit_defaults=True, forbid_unknown_fields=True):
    """New tokens of one request since its previous Output (delta, not cumulative)."""

    version: int
    request_id: str
    token_ids: list[int] = []
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it, as vLLM reports
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    error: str | None = None  # set when the worker failed the request; finished is then True
    logprobs: list[PositionLogprobs] | None = None  # one per new token, when sampling.logprobs is set
    # Per prompt position when sampling.prompt_logprobs is set (the first position has none: empty).
    prompt_logprobs: list[PositionLogprobs] | None = None


_TYPES: dict[MsgType, type[msgspec.Struct]] = {
    MsgType.SUBMIT: Submit,
    MsgType.ABORT: Abort,
    MsgType.PING: Ping,
    MsgType.OUTPUT: Output,
    MsgType.PONG: Pong,
}
_TAGS: dict[type[msgspec.Struct], MsgType] = {cls: tag for tag, cls in _TYPES.items()}
_DECODERS = {tag: msgspec.msgpack.Decoder(cls) for tag, cls in _TYPES.items()}
_ENCODER = msgspec.msgpack.Encoder()

Message = Submit | Abort | Ping | Output | Pong


def encode(message: Message) -> list[bytes]:
    """Frames for one message: [tag, body]."""
    return [_TAGS[type(message)].value, _ENCODER.encode(message)]


def decode(frames: list[bytes]) -> Message:
    """Parse [tag, body], enforcing limits and version before trusting anything."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (type tag, body), got {len(frames)}")
    tag_frame, body = frames
    try:
        tag = MsgType(bytes(tag_frame))
    except ValueError:
        raise ProtocolError(f"unknown message type tag {bytes(tag_frame)[:8]!r}") from None
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"{tag.name} body of {len(body)} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
    try:
        message = _DECODERS[tag].decode(body)
    # VLLMValidationError: SamplingParams checks its own values as it is decoded (__post_init__).
    except (msgspec.DecodeError, msgspec.ValidationError, VLLMValidationError) as exc:
        raise ProtocolError(f"malformed {tag.name} body: {exc}") from None
    if message.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{tag.name} has protocol version {message.version}; this side speaks {PROTOCOL_VERSION}"
        )
    if isinstance(message, Submit):
        _check_submit(message)
    return message


def request_id_of(frames: list[bytes]) -> str | None:
    """Best-effort request id of a refused message, so the sender can be told which request failed."""
    try:
        body = msgspec.msgpack.decode(frames[1])
    except msgspec.DecodeError:  # not even msgpack: no id to report
        return None
    if isinstance(body, list) and len(body) > 1 and isinstance(body[1], str):
        return body[1]
    return None


def _check_submit(message: Submit) -> None:
    if not message.request_id:
        raise ProtocolError("SUBMIT.request_id is empty")
    if not message.prompt_token_ids:
        raise ProtocolError("SUBMIT.prompt_token_ids is empty; a request needs at least one prompt token")
    if len(message.prompt_token_ids) > MAX_PROMPT_TOKENS:
        raise ProtocolError(f"SUBMIT.prompt_token_ids has {len(message.prompt_token_ids)} tokens (limit {MAX_PROMPT_TOKENS})")
    sampling = message.sampling
    if sampling.max_tokens is None or sampling.max_tokens < 1:
        raise ProtocolError(f"SUBMIT.sampling.max_tokens={sampling.max_tokens} must be >= 1")
    if sampling.n != 1:
        raise ProtocolError(f"SUBMIT.sampling.n={sampling.n}; a worker runs one sequence per request "
                            "(the router fans n out)")
