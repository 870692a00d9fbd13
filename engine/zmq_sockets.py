"""The one place that makes ZeroMQ sockets for the control plane.

Every socket gets: linger 0 (a dead peer never blocks shutdown), explicit
high-water marks (a stalled peer backs pressure up instead of growing memory
without bound) and a maximum message size (ZeroMQ refuses larger frames
before allocating them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import zmq
import zmq.asyncio

DEFAULT_HWM = 10_000
DEFAULT_MAX_MSG_BYTES = 16 * 1024 * 1024


def make_socket(
    ctx: zmq.Context | zmq.asyncio.Context,
    socket_type: int,
    endpoint: str,
    *,
    bind: bool,
    hwm: int = DEFAULT_HWM,
    max_msg_bytes: int = DEFAULT_MAX_MSG_BYTES,
    identity: bytes | None = None,
) -> zmq.Socket:
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if socket_type == zmq.ROUTER:
        # Sending to a peer that went away raises instead of silently dropping.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


@contextlib.contextmanager
def socket(ctx, socket_type: int, endpoint: str, **kwargs) -> Iterator[zmq.Socket]:
    sock = make_socket(ctx, socket_type, endpoint, **kwargs)
    try:
        yield sock
    finally:
        sock.close(linger=0)
