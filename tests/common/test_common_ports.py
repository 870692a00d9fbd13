"""Chosen ports stay out of the kernel's way, and a reserved one out of everyone's but its worker's."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from common.ports import (LOWEST_CHOSEN_PORT, chosen_port_range, free_tcp_port, release_tcp_ports,
                          reserve_tcp_ports)


def _plain_bind(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def test_ports_are_chosen_below_the_kernels_ephemeral_range(tmp_path):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    assert chosen_port_range(ranges) == (LOWEST_CHOSEN_PORT, 32767)
    ranges.write_text("20500 60999\n")  # too few below it: the kernel chooses
    assert chosen_port_range(ranges) is None
    assert chosen_port_range(tmp_path / "missing") is None
    here = chosen_port_range()
    if here is None:
        pytest.skip("this machine's ephemeral range leaves no room below it")
    for _ in range(50):
        port = free_tcp_port(count=3)
        assert here[0] <= port and port + 2 <= here[1]


def test_a_reserved_port_refuses_other_binds_until_released_but_takes_its_zeromq_listener():
    port = reserve_tcp_ports("127.0.0.1", 2)
    try:
        assert not _plain_bind(port) and not _plain_bind(port + 1)
        # Another process choosing ports passes it by.
        assert all(free_tcp_port() not in (port, port + 1) for _ in range(200))
        # The worker's own bind, a ZeroMQ listener in another process (SO_REUSEADDR), succeeds
        # and carries a message.
        code = ("import zmq; c = zmq.Context(); r = c.socket(zmq.ROUTER); r.bind('tcp://*:%d'); "
                "d = c.socket(zmq.DEALER); d.connect('tcp://127.0.0.1:%d'); d.send(b'hi'); "
                "print(r.recv_multipart()[1].decode())" % (port + 1, port + 1))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == "hi", done.stderr[-2000:]
    finally:
        assert release_tcp_ports("127.0.0.1", port)
    assert _plain_bind(port)  # (port + 1 had a connection: TIME_WAIT keeps plain binds off it a while)
    assert not release_tcp_ports("127.0.0.1", port)
