"""Failures beside the data path are logged with their traceback and counted, not hidden."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from common.roles import Role
from engine.config import EngineSettings
from engine.worker_server import WorkerServer
from engine.worker_spec import WorkerSpec
from router.worker_client import WorkerClient


def test_broken_kv_stats_are_logged_once_with_traceback_and_counted(caplog):
    def broken_reader() -> dict[str, float]:
        raise KeyError("transfers_sent_ok")

    server = WorkerServer(settings=EngineSettings(model="unused"), role=Role.DECODE, worker_id="d0",
                          control_endpoint="ipc:///tmp/unused", kv_stats_reader=broken_reader)
    with caplog.at_level(logging.DEBUG, logger="engine.worker_server"):
        first, second = server.load_report(), server.load_report()
    assert first.kv_stats == {"stats_read_failures": 1.0} and second.kv_stats == {"stats_read_failures": 2.0}
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0] is KeyError
    server.kv_stats_reader = lambda: {"transfers_sent_ok": 3}  # it recovers; the count stays visible
    assert server.load_report().kv_stats == {"transfers_sent_ok": 3.0, "stats_read_failures": 2.0}


class _BrokenHealthLoop(WorkerClient):
    async def _health_loop(self) -> None:
        raise RuntimeError("health loop bug")


def test_a_client_loop_that_dies_says_why(caplog, tmp_path):
    async def scenario():
        ctx = zmq.asyncio.Context()
        client = _BrokenHealthLoop(WorkerSpec("p0", Role.PREFILL, f"ipc://{tmp_path}/p0.sock"), ctx)
        client.start()
        await asyncio.sleep(0.05)
        await client.close()
        ctx.term()

    with caplog.at_level(logging.ERROR, logger="router.worker_client"):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if "stopped" in r.getMessage()]
    assert len(errors) == 1 and "p0" in errors[0].getMessage()
    assert isinstance(errors[0].exc_info[1], RuntimeError)
