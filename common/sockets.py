"""The one place the project makes ZeroMQ sockets: the KV data path and the
router<->worker control plane (engine.worker_server, router.worker_client).

Every socket gets: bind or connect, linger (so close never hangs on a dead
peer), high-water marks (ZeroMQ's own flow control: a full queue blocks or
fails the sender instead of growing memory), send/receive timeouts, and, on
receivers, ZMQ_MAXMSGSIZE so an oversized frame is dropped by ZeroMQ before
it is buffered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import zmq

VALID_SCHEMES = ("tcp://", "ipc://", "inproc://")


def check_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(VALID_SCHEMES):
        raise ValueError(
            f"endpoint {endpoint!r} is not a ZeroMQ address; use tcp://HOST:PORT or ipc:///path/to/socket"
        )
    return endpoint


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint; None for other transports."""
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def tcp_address(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a tcp:// endpoint; None for other transports."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} needs a numeric port")
    return host, int(port)


def prepare_bind(endpoint: str) -> None:
    """Make an ipc endpoint's folder: ZeroMQ makes the socket file, not its folder."""
    if (path := ipc_path(endpoint)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def make_socket(
    ctx: zmq.Context,
    socket_type: int,
    endpoint: str,
    *,
    bind: bool,
    hwm_messages: int = 64,
    linger_ms: int = 0,
    send_timeout_ms: int = -1,
    recv_timeout_ms: int = -1,
    max_message_bytes: int = -1,
    immediate: bool = False,
    identity: bytes | None = None,
    router_mandatory: bool = False,
) -> zmq.Socket:
    """Create, configure and bind/connect a socket. The caller closes it."""
    check_endpoint(endpoint)
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm_messages)
    sock.setsockopt(zmq.RCVHWM, hwm_messages)
    sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    sock.setsockopt(zmq.RCVTIMEO, recv_timeout_ms)
    if max_message_bytes > 0:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if immediate:
        # Queue only to peers that are connected: with no decode worker up a send
        # times out instead of piling KV up in memory for a peer that may never come.
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if router_mandatory:
        # A ROUTER sending to a peer that went away raises instead of silently dropping.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    try:
        if bind:
            prepare_bind(endpoint)
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except (zmq.ZMQError, OSError) as exc:
        sock.close(linger=0)
        raise ValueError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from None
    return sock


@contextlib.contextmanager
def socket(ctx: zmq.Context, socket_type: int, endpoint: str, **options) -> Iterator[zmq.Socket]:
    sock = make_socket(ctx, socket_type, endpoint, **options)
    try:
        yield sock
    finally:
        sock.close(linger=0)
