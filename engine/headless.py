"""One host's share of an engine whose ranks span hosts: vLLM's headless workers.

A plan group whose pipeline stages sit on several hosts runs as one vLLM
engine with the multiprocessing executor over `nnodes` hosts (vLLM's Ray
executor refuses the CPU platform; docs/lab.md). Host 0 runs the usual
worker (AsyncLLM behind the control endpoint, engine.worker_server), which
drives every rank; each other host runs this: its ranks and nothing else, as
`vllm serve --headless --node-rank k` does (vllm/entrypoints/cli/serve.py,
run_headless). It takes the worker's own command line, so its engine config
(model, layer split, KV connector with every rank's endpoint) is the head's.
Its ranks' KV receivers listen on this host: prefill sends each rank its
layers directly, across the hosts' link.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from engine.config import EngineSettings

log = logging.getLogger(__name__)
PARENT_POLL_S = 1.0


def run_headless(settings: EngineSettings, exit_with_parent: bool = False) -> None:
    """Run this host's ranks until they exit, SIGTERM/SIGINT, or (exit_with_parent) the starter dies."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    if settings.node_rank == 0:
        raise ValueError("node rank 0 is the engine itself (the worker server), not a headless host")
    settings.apply_process_env()
    config = AsyncEngineArgs(**settings.engine_kwargs()).create_engine_config(headless=True)

    def stop(signum, frame):  # as vLLM's run_headless: leave the monitor's wait, then shut down
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if exit_with_parent:
        _watch_parent(os.getppid())
    log.info("host %d of %d: this host's ranks of the engine at %s:%s", settings.node_rank, settings.nnodes,
             settings.master_addr, settings.master_port)
    executor = MultiprocExecutor(config, monitor_workers=False)
    try:
        executor.start_worker_monitor(inline=True)  # returns when one of this host's ranks exits
    finally:
        executor.shutdown()


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        log.warning("parent %d exited; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="hexserve-parent-watch").start()
