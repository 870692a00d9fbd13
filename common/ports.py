"""Free TCP ports: the one helper the project (and its tests) use to find them."""

from __future__ import annotations

import contextlib
import socket


def free_tcp_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port p such that p .. p+count-1 are all free now (a TP decode worker's
    ranks listen on consecutive ports, see kvtransfer.handoff.rank_endpoint)."""
    for _ in range(100):
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            first.bind((host, 0))
            port = first.getsockname()[1]
            if port + count - 1 > 65535:
                continue
            try:
                for offset in range(1, count):
                    held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).bind((host, port + offset))
            except OSError:
                continue
            return port
    raise RuntimeError(f"found no {count} consecutive free TCP ports on {host}")
