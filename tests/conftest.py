"""Session-wide fixtures: the tiny model and one colocated reference engine;
and a session-end check that no test left ZeroMQ socket files behind.

Each vLLM CPU engine costs ~30 s to start, so tests across areas share the
same reference engine instead of starting their own.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from engine.tiny_model import build_tiny_model

    return str(build_tiny_model())


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir):
    """One colocated vLLM engine (prefill and decode in one) serving the tiny model."""
    from vllm import LLM

    from engine.config import tiny_model_settings

    settings = tiny_model_settings(model=tiny_model_dir)
    settings.apply_process_env()
    llm = LLM(**settings.engine_kwargs())
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()



@pytest.fixture(scope="session")
def embedded_router(tmp_path_factory, tiny_model_dir):
    """`python -m router serve` (the embedded default: one prefill, one decode worker), with an API key."""
    from router_process import EMBEDDED_API_KEY, start_router

    router = start_router(tmp_path_factory.mktemp("embedded-router"), api_key=EMBEDDED_API_KEY)
    yield router
    router.stop()


# What the socket folder held when this session started: only entries that
# appear later are this session's to answer for.
_SOCKETS_AT_START: set[Path] = set()


def _socket_entries() -> set[Path]:
    from router.launch_local import socket_root

    root = socket_root()
    return set(root.iterdir()) if root.is_dir() else set()


def _left_behind() -> list[Path]:
    """Socket files or run folders that appeared during the session and whose
    router (named by pid) is this process or has exited: nobody will remove them."""
    left = []
    for entry in sorted(_socket_entries() - _SOCKETS_AT_START):
        owner = entry.name.split("-", 1)[0]
        if owner.isdigit() and (int(owner) == os.getpid() or not psutil.pid_exists(int(owner))):
            left.append(entry)
    return left


def pytest_sessionstart(session):
    _SOCKETS_AT_START.update(_socket_entries())


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when its routers or launchers left socket files (issue 18):
    a later run must find a clean socket folder."""
    left = _left_behind()
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"  {p}" + (f" ({', '.join(sorted(c.name for c in p.iterdir()))})" if p.is_dir() else "") for p in left]
    message = "the tests left ZeroMQ socket files behind:\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
