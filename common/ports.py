"""Free TCP ports: the one helper the project (and its tests) use to find them.

A port chosen now is bound later, by another process: a worker binds its
endpoints only once its model has loaded, a minute or more on a busy CPU. Two
things can take the port in that window, and both happened (a Ray actor's
engine died with "Address already in use" on the KV-events port it was given):

- the kernel, handing it out as the local port of an outgoing connection or of
  someone's bind to port 0 (Ray and gRPC open many). Ports are therefore chosen
  below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`)
  and above Ray's worker ports (10002-19999 by default), where the kernel never
  assigns one by itself;
- another process choosing ports at the same time (the Ray actors of one node
  each choose their workers'). `reserve_tcp_ports` keeps the chosen ports bound
  in this process until `release_tcp_ports`: a bound socket makes every other
  plain bind, and the kernel's own choice, pass the port by, while SO_REUSEADDR
  (set after the bind, so the bind itself still proves the port free) lets a
  ZeroMQ listener, which sets SO_REUSEADDR too, bind it. Nothing listens on the
  held socket, so it takes no connections.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from pathlib import Path

LOWEST_CHOSEN_PORT = 20000  # above Ray's default worker ports (10002-19999) and its other fixed ports
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
MIN_CHOSEN_RANGE = 1000  # fewer ports than this below the ephemeral range: let the kernel choose
ATTEMPTS = 200

_held: dict[tuple[str, int], list[socket.socket]] = {}
_held_lock = threading.Lock()


def chosen_port_range(range_file: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The ports [low, high] to choose from: from LOWEST_CHOSEN_PORT up to just below
    the kernel's ephemeral range; None where that is too narrow or unknown (not Linux)."""
    try:
        ephemeral_low = int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    high = ephemeral_low - 1
    return (LOWEST_CHOSEN_PORT, high) if high - LOWEST_CHOSEN_PORT + 1 >= MIN_CHOSEN_RANGE else None


def _candidate(host: str, port_range: tuple[int, int] | None) -> int:
    if port_range is not None:
        return random.randint(*port_range)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # the kernel's choice, the fallback
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _bind_range(host: str, count: int, port_range: tuple[int, int] | None) -> tuple[int, list[socket.socket]]:
    """A port p with p .. p+count-1 free, and plain sockets bound to them (the proof)."""
    for _ in range(ATTEMPTS):
        port = _candidate(host, port_range)
        if port + count - 1 > (port_range[1] if port_range else 65535):
            continue
        bound: list[socket.socket] = []
        try:
            for offset in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                bound.append(sock)
                sock.bind((host, port + offset))
        except OSError:
            for sock in bound:
                sock.close()
            continue
        return port, bound
    raise RuntimeError(f"found no {count} consecutive free TCP ports on {host}")


def free_tcp_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port p such that p .. p+count-1 are all free now (a TP decode worker's
    ranks listen on consecutive ports, see kvtransfer.handoff.rank_endpoint).
    Not held: for a port its user binds soon, or one that must stay closed."""
    port, bound = _bind_range(host, count, chosen_port_range())
    for sock in bound:
        sock.close()
    return port


def reserve_tcp_ports(host: str = "127.0.0.1", count: int = 1) -> int:
    """Like free_tcp_port, but the ports stay held by this process until
    release_tcp_ports(host, port): for a worker that binds them much later."""
    port, bound = _bind_range(host, count, chosen_port_range())
    for sock in bound:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with _held_lock:
        _held[(host, port)] = bound
    return port


def release_tcp_ports(host: str, port: int) -> bool:
    """Stop holding what reserve_tcp_ports(host, ...) returned as `port`; False if not held."""
    with _held_lock:
        bound = _held.pop((host, port), None)
    for sock in bound or []:
        with contextlib.suppress(OSError):
            sock.close()
    return bound is not None
