"""The command line every worker shares; each role adds what is its own.

    python -m prefill ...   prefill.worker.COMMAND_LINE   (KV producer)
    python -m decode ...    decode.worker.COMMAND_LINE    (KV consumer)
    python -m engine ...    COLOCATED_COMMAND_LINE        (no KV connector: one engine
                                                           computes the prompt and generates)

A role hands `main` a `WorkerCommandLine`: its name and how its options
become the engine's kv_transfer_config. Everything else (model, sizes, the
control endpoint, the worker server) is the same for every role, here.

`--flexible-role` (prefill and decode only) gives the engine a kv_both
connector instead of the role's own: it sends KV as a prefill worker and
receives it as a decode worker, so the router may flip its role without a
restart (`router serve --flexible-roles`, then `POST /plan`). It is built
here, once for both roles (`flexible_kv_transfer_config`).

The router starts workers with this same command line (locally as
subprocesses, or inside Ray actors), so a user can also start one by hand on
any machine and point a plan at it.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.roles import Role
from engine.config import DEFAULT_CPU_KVCACHE_GIB, EngineSettings
from engine.worker_server import WorkerServer, run_worker
from engine.worker_spec import WORKER_MODULES

# (kv_endpoint, kv_connector) -> the engine's kv_transfer_config, or None for no connector.
KVConfigBuilder = Callable[[str | None, str], dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class WorkerCommandLine:
    """What one role adds to the shared worker command line."""

    role: Role
    description: str
    # With a builder the worker takes --kv-endpoint and --kv-connector; without, it moves no KV.
    kv_transfer_config: KVConfigBuilder | None = None


COLOCATED_COMMAND_LINE = WorkerCommandLine(
    role=Role.COLOCATED,
    description="Run one colocated worker: one engine computes each prompt and generates its answer (no KV transfer).",
)


def flexible_kv_transfer_config(kv_endpoint: str | None, kv_connector: str) -> dict[str, Any] | None:
    """Both sides of the KV connector (kv_both), listening on `kv_endpoint` as a
    decode worker does; None with `--kv-connector none` (no KV moves, so either
    role serves without a connector)."""
    if not kv_endpoint:
        raise ValueError("--flexible-role needs --kv-endpoint: a worker that may become a decode worker "
                         "receives KV there")
    if kv_connector == "none":
        return None
    from kvtransfer import connector_config

    return connector_config(role="both", listen_endpoint=kv_endpoint)


def kv_stats_reader(settings: EngineSettings):
    """A callable returning the connector's transfer counters, or None without a connector."""
    if settings.kv_transfer_config is None:
        return None
    from kvtransfer import read_stats, stats_path

    path = stats_path(settings.kv_transfer_config)

    def read() -> dict[str, float]:
        counters = read_stats(path)
        return {k: float(v) for k, v in counters.items() if k not in ("pid", "time_s")}

    return read


def build_parser(command_line: WorkerCommandLine) -> argparse.ArgumentParser:
    role = command_line.role
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULES[role]}", description=command_line.description)
    parser.add_argument("--model", default=None, help="local model folder or hub name (default: the tiny model, built on first use)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--control-endpoint", default=None,
                        help="ZeroMQ endpoint to bind for the router, e.g. tcp://127.0.0.1:7001 (needed but on a headless host)")
    if command_line.kv_transfer_config is not None:
        parser.add_argument("--kv-endpoint", default=None, help="ZeroMQ endpoint where this worker's KV connector listens")
        parser.add_argument("--kv-connector", default="zmq", choices=["zmq", "none"],
                            help="'none': no KV transfer (decode recomputes the prompt)")
        parser.add_argument("--flexible-role", action="store_true",
                            help="run a kv_both KV connector (send and receive, needs --kv-endpoint), so that the "
                                 "router may flip this worker between prefill and decode without a restart")
    parser.add_argument("--kv-events-endpoint", default=None,
                        help="ZeroMQ endpoint where the engine publishes its KV-cache events for the router's prefix index")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="default: float32 for the tiny model, else auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per KV-cache block (default: vLLM's for the platform; CPU needs a multiple of 32)")
    parser.add_argument("--cpu-kvcache-gib", type=int, default=DEFAULT_CPU_KVCACHE_GIB)
    parser.add_argument("--kv-cache-blocks", type=int, default=None,
                        help="KV-cache blocks the engine may use (vLLM's num_gpu_blocks_override; default: what memory allows)")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the starting process dies")
    hosts = parser.add_argument_group("an engine whose ranks span hosts (vLLM's multiprocessing executor)")
    hosts.add_argument("--nnodes", type=int, default=1, help="hosts the engine's ranks span (each runs as many)")
    hosts.add_argument("--node-rank", type=int, default=0,
                       help="this host's index; 0 runs the engine and its control endpoint, others run headless")
    hosts.add_argument("--master-addr", default=None, help="host 0's address, where the ranks meet")
    hosts.add_argument("--master-port", type=int, default=None, help="a free port on host 0 for the ranks to meet at")
    return parser


def settings_from_args(command_line: WorkerCommandLine, args: argparse.Namespace) -> EngineSettings:
    from engine.tiny_model import TINY_MODEL_NAME, build_tiny_model, is_tiny_model

    kv_config = None  # first: a bad KV option is refused before the tiny model is built
    if command_line.kv_transfer_config is not None:
        build = flexible_kv_transfer_config if args.flexible_role else command_line.kv_transfer_config
        kv_config = build(args.kv_endpoint, args.kv_connector)
    model = args.model
    served_name = args.served_model_name
    dtype = args.dtype
    if model is None:
        model = str(build_tiny_model())
        served_name = served_name or TINY_MODEL_NAME
    if is_tiny_model(model):
        dtype = dtype or "float32"
    return EngineSettings(
        model=model,
        served_model_name=served_name,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        dtype=dtype or "auto",
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        cpu_kvcache_gib=args.cpu_kvcache_gib,
        block_size=args.block_size,
        num_kv_cache_blocks=args.kv_cache_blocks,
        kv_transfer_config=kv_config,
        kv_events_endpoint=args.kv_events_endpoint,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )


def main(command_line: WorkerCommandLine, argv: list[str] | None = None) -> None:
    role = command_line.role
    logging.basicConfig(level=os.environ.get("HEXSERVE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    parser = build_parser(command_line)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(command_line, args)
    except ValueError as exc:  # a bad option: say which, exit 2, as for any other
        parser.error(str(exc))
    if settings.node_rank > 0:  # this host's ranks of an engine that spans hosts: no server of its own
        from engine.headless import run_headless

        try:
            run_headless(settings, exit_with_parent=args.exit_with_parent)
        finally:
            remove_kv_stats(settings)
        return
    if args.control_endpoint is None:
        parser.error("--control-endpoint is required (but on a headless host, --node-rank > 0)")
    server = WorkerServer(
        settings=settings,
        role=role,
        worker_id=args.worker_id or f"{role}-{os.getpid()}",
        control_endpoint=args.control_endpoint,
        kv_stats_reader=kv_stats_reader(settings),
    )
    try:
        run_worker(server, exit_with_parent=args.exit_with_parent)
    finally:
        remove_kv_stats(settings)


def remove_kv_stats(settings: EngineSettings) -> None:
    """The connector's counters files go with the worker (they were left in the temp dir before)."""
    if settings.kv_transfer_config is not None:
        from kvtransfer import remove_stats, stats_path

        remove_stats(stats_path(settings.kv_transfer_config))
