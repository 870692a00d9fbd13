"""One worker, described once: its role, where it listens, what it runs, how to start it.

The deployment builds these from a plan (router.deployment); the launchers
start a process from each (`command()`, `process_env()`); the router's client
connects to `control_endpoint`; and a prefill request tells its connector
where the chosen decode worker takes its KV (`kv_endpoint`, one socket per
engine rank) and how that worker's cache is split (`tensor_parallel_size`,
`layers_per_stage`). A `flexible` worker runs a kv_both connector, so the
router may flip it between prefill and decode without restarting it: its
process keeps the role it started with (its module, what it reports), and
the router's copy of its spec takes the new one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from common.cpu_cgroup import join_command
from common.roles import Role
from common.sockets import tcp_address

# The module each role's worker runs as (`python -m <module>`): a colocated
# worker is the bare engine, with no KV connector.
WORKER_MODULES = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.COLOCATED: "engine"}


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything needed to start one worker process, wherever it runs, and to reach it."""

    worker_id: str
    role: Role
    control_endpoint: str
    # Where the worker's KV connector listens (a decode worker's ranks add .rank<r>,
    # see kvtransfer.rank_endpoint); None for a worker that takes no KV.
    kv_endpoint: str | None = None
    # Where the worker's engine publishes KV-cache events (vLLM's BlockStored /
    # BlockRemoved) for the router's prefix index; None: none published.
    kv_events_endpoint: str | None = None
    model: str | None = None  # None: the tiny model
    served_model_name: str | None = None
    max_model_len: int = 1024
    kv_connector: str = "zmq"  # prefill and decode: "none" moves no KV (decode recomputes); unused by colocated
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Layers per pipeline stage (the plan's uneven split); () with one stage.
    layer_partition: tuple[int, ...] = ()
    cpu_kvcache_gib: int = 1
    block_size: int | None = None  # tokens per KV-cache block; None: vLLM's default for the platform
    env: tuple[tuple[str, str], ...] = ()  # e.g. CUDA_VISIBLE_DEVICES for the group's GPUs
    # An emulated device (common.emulated_device): the cgroup the worker runs in, and its KV blocks.
    cpu_cgroup: str | None = None
    kv_cache_blocks: int | None = None
    group_id: str | None = None
    # Started with a kv_both connector (it sends KV and receives it): the router may
    # flip it between prefill and decode without a restart (POST /plan).
    flexible: bool = False
    # An engine whose ranks span `nnodes` hosts (a group across nodes): this spec starts
    # host `node_rank`'s share (0: the engine with its control endpoint; others headless,
    # engine.headless); they meet at `master_endpoint`, tcp://<host 0>:<free port>.
    nnodes: int = 1
    node_rank: int = 0
    master_endpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role.parse(self.role, field=f"worker {self.worker_id} role"))
        if not self.moves_kv and self.kv_endpoint is not None:
            raise ValueError(f"worker {self.worker_id} is colocated: it moves no KV, so it has no kv_endpoint")
        if self.flexible and (not self.moves_kv or self.kv_endpoint is None):
            raise ValueError(
                f"worker {self.worker_id} is flexible (its role may flip between prefill and decode), so it must be "
                f"a prefill or decode worker with a kv_endpoint to receive KV on; got role {self.role}, "
                f"kv_endpoint={self.kv_endpoint!r}")
        if self.pipeline_parallel_size > 1 and len(self.layer_partition) != self.pipeline_parallel_size:
            # Prefill must know a pipelined decode worker's split to send each stage its layers.
            raise ValueError(
                f"worker {self.worker_id} has pipeline_parallel_size={self.pipeline_parallel_size} but "
                f"layer_partition={list(self.layer_partition)}; give the layers of each of its stages")

        if self.nnodes > 1 and (self.num_ranks % self.nnodes or self.master_endpoint is None
                                or tcp_address(self.master_endpoint) is None):
            raise ValueError(f"worker {self.worker_id} spans {self.nnodes} hosts: they must share its "
                             f"{self.num_ranks} ranks evenly and meet at a master_endpoint tcp://HOST:PORT "
                             f"(got {self.master_endpoint!r})")

    @property
    def moves_kv(self) -> bool:
        """Prefill and decode workers move KV between them; a colocated worker keeps its own."""
        return self.role is not Role.COLOCATED

    @property
    def num_ranks(self) -> int:
        """Engine ranks; a decode worker's KV endpoint needs one socket per rank."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def layers_per_stage(self) -> tuple[int, ...] | None:
        """A pipelined worker's layers per stage; None with one stage."""
        return self.layer_partition if self.pipeline_parallel_size > 1 else None

    def process_env(self) -> dict[str, str]:
        """What the worker process gets on top of its launcher's environment."""
        env = dict(self.env)
        if self.pipeline_parallel_size > 1:
            env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(n) for n in self.layer_partition)
        return env

    def launch_command(self) -> list[str]:
        """What a launcher runs: the command, inside the worker's cgroup when it has one."""
        if self.cpu_cgroup is None:
            return self.command()
        return join_command(self.command(), Path(self.cpu_cgroup))

    def command(self) -> list[str]:
        """The worker's command line (the same locally and inside a Ray actor)."""
        cmd = [sys.executable, "-m", WORKER_MODULES[self.role],
               "--worker-id", self.worker_id,
               "--control-endpoint", self.control_endpoint,
               "--max-model-len", str(self.max_model_len),
               "--tensor-parallel-size", str(self.tensor_parallel_size),
               "--pipeline-parallel-size", str(self.pipeline_parallel_size),
               "--cpu-kvcache-gib", str(self.cpu_kvcache_gib),
               "--exit-with-parent"]
        if self.moves_kv:
            cmd += ["--kv-connector", self.kv_connector]
        if self.kv_endpoint:
            cmd += ["--kv-endpoint", self.kv_endpoint]
        if self.flexible:
            cmd += ["--flexible-role"]
        if self.kv_events_endpoint:
            cmd += ["--kv-events-endpoint", self.kv_events_endpoint]
        if self.block_size is not None:
            cmd += ["--block-size", str(self.block_size)]
        if self.kv_cache_blocks is not None:
            cmd += ["--kv-cache-blocks", str(self.kv_cache_blocks)]
        if self.nnodes > 1:
            host, port = tcp_address(self.master_endpoint)
            cmd += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                    "--master-addr", host, "--master-port", str(port)]
        if self.model:
            cmd += ["--model", self.model]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        return cmd
