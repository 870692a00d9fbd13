"""Engine settings shared by the prefill and decode workers, the tests and benchmarks.

One place decides how a vLLM engine is built on this project's machines, so
that a prefill engine, a decode engine and the colocated reference engine a
test compares them against are configured identically except for their KV
role. Token equality between them depends on that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from common.sockets import tcp_address

# vLLM's CPU backend sizes its KV cache from this variable (GiB), not from
# gpu_memory_utilization. 1 GiB holds thousands of tokens of the tiny model.
DEFAULT_CPU_KVCACHE_GIB = 1
# Tokens per KV-cache block when none is given: vLLM's default on CPU.
CPU_DEFAULT_BLOCK_SIZE = 128


@dataclass(slots=True)
class EngineSettings:
    """What a worker needs to start one vLLM engine.

    `model` is a local folder or a hub name; on CPU machines with no network it
    is the tiny model's folder (see `engine.tiny_model`).
    """

    model: str
    served_model_name: str | None = None
    max_model_len: int = 1024
    dtype: str = "auto"
    seed: int = 0
    block_size: int | None = None
    # KV-cache blocks the engine may use (an emulated device's KV memory); None: what memory allows.
    num_kv_cache_blocks: int | None = None
    max_num_seqs: int = 64
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_transfer_config: dict[str, Any] | None = None
    cpu_kvcache_gib: int = DEFAULT_CPU_KVCACHE_GIB
    # Where the engine publishes its KV-cache events (blocks stored and removed)
    # for the router's prefix index; None publishes nothing.
    kv_events_endpoint: str | None = None
    # An engine whose ranks span hosts: vLLM's multiprocessing executor on `nnodes`
    # hosts, this process on host `node_rank` (0: the engine itself; others: headless,
    # engine.headless), the ranks meeting at the head's master_addr:master_port.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_model_len < 16:
            raise ValueError(f"max_model_len={self.max_model_len} is too small; use at least 16")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.num_kv_cache_blocks is not None and self.num_kv_cache_blocks < 1:
            raise ValueError(f"--kv-cache-blocks={self.num_kv_cache_blocks} must be >= 1")
        if self.nnodes > 1 and (self.master_addr is None or self.master_port is None):
            raise ValueError(f"--nnodes={self.nnodes} needs --master-addr and --master-port (the head host's)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank={self.node_rank} must be in 0..{self.nnodes - 1} (--nnodes={self.nnodes})")
        if (self.tensor_parallel_size * self.pipeline_parallel_size) % self.nnodes:
            raise ValueError(f"--nnodes={self.nnodes} must divide the engine's ranks "
                             f"({self.tensor_parallel_size} x {self.pipeline_parallel_size}): each host runs as many")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM(...)` or `vllm.AsyncEngineArgs(...)`."""
        kwargs: dict[str, Any] = dict(
            model=self.model,
            served_model_name=self.served_model_name,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            seed=self.seed,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
        )
        if self.block_size is not None:
            kwargs["block_size"] = self.block_size
        if self.num_kv_cache_blocks is not None:
            kwargs["num_gpu_blocks_override"] = self.num_kv_cache_blocks
        if self.kv_transfer_config is not None:
            kwargs["kv_transfer_config"] = self.kv_transfer_config
        if self.nnodes > 1:
            kwargs.update(distributed_executor_backend="mp", nnodes=self.nnodes, node_rank=self.node_rank,
                          master_addr=self.master_addr, master_port=self.master_port)
        if self.kv_events_endpoint is not None:
            from vllm.config import KVEventsConfig

            kwargs["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=events_bind_endpoint(self.kv_events_endpoint))
        kwargs.update(self.extra)
        return kwargs

    def apply_process_env(self) -> None:
        """Set the environment vLLM reads at engine start (call before building an engine).

        On a machine without a GPU, vLLM's engine processes stop busy-waiting
        on each other (see engine.vllm_plugin): with several engines sharing
        few cores, spinning readers starve the model.
        """
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_gib))
        if not _has_cuda():
            os.environ.setdefault("HEXSERVE_VLLM_SPIN_SLEEP_S", "0.0002")
            world_size = self.tensor_parallel_size * self.pipeline_parallel_size // self.nnodes  # this host's ranks
            if world_size > 1:
                # vLLM's CPU worker binds each rank's threads to NUMA nodes and
                # refuses more ranks than nodes; give each rank its own cores.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(world_size))


def events_bind_endpoint(endpoint: str) -> str:
    """What the engine's event publisher binds for subscribers to reach `endpoint`.

    vLLM's publisher binds ipc endpoints and wildcard TCP ones but *connects*
    to a TCP endpoint that names a host (ZmqEventPublisher._is_bind_endpoint),
    so tcp://10.0.0.5:7000 is bound as tcp://*:7000.
    """
    address = tcp_address(endpoint)
    return endpoint if address is None else f"tcp://*:{address[1]}"


def cpu_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value splitting this process's CPUs among `ranks`
    ("0|1" for 2 ranks on 2 cores; cores are shared when there are fewer than ranks)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        return "|".join(str(cpus[rank % len(cpus)]) for rank in range(ranks))
    per_rank = len(cpus) // ranks
    groups = [cpus[rank * per_rank : (rank + 1) * per_rank] for rank in range(ranks)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def tiny_model_settings(**overrides: Any) -> EngineSettings:
    """Settings for the tiny model on CPU: float32 so batch shape never flips a greedy argmax."""
    from engine.tiny_model import TINY_MODEL_NAME, build_tiny_model

    values: dict[str, Any] = dict(
        model=str(build_tiny_model()),
        served_model_name=TINY_MODEL_NAME,
        dtype="float32",
        max_model_len=1024,
    )
    values.update(overrides)
    return EngineSettings(**values)
