"""A node's emulated devices: what a worker placed there gets instead of a GPU.

The lab (lab/) starts each emulated host's Ray node with
`$HEXSERVE_EMULATED_DEVICES` naming a JSON file that says what one device of
the host is: CPU time (a cgroup quota) and KV-cache memory (tokens). A worker the Ray
launcher places on that node for `n` devices runs in its own cgroup under the
host's, and an engine with `n` devices' KV blocks. The quota of `n` devices'
CPU time holds only the process that runs the model (vLLM's worker process,
which joins `<worker cgroup>/device` when it loads the model: see
engine.vllm_plugin): that is what a GPU does. The serving front end and the
engine core are host work, which on a GPU machine runs on the host's own
cores; charged to the device they took its time in bursts (three processes
running at once on two cores spend a 10 ms period's quota early, then the
model waits out the period): the lab's decode device served tokens ~1.4x
slower than with the model alone in its quota (README, "Heterogeneous lab",
run 4).
Nodes without the variable (real GPU nodes) are untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cpu_cgroup import DEFAULT_CFS_PERIOD_US, CpuQuota

EMULATED_DEVICES_ENV = "HEXSERVE_EMULATED_DEVICES"
DEVICE_CGROUP_ENV = "HEXSERVE_DEVICE_CGROUP"  # where the model's process goes, with the devices' quota


@dataclass(frozen=True, slots=True)
class EmulatedDevices:
    gpu_type: str
    num_devices: int
    cpu_cores_per_device: float
    kv_cache_tokens_per_device: int
    cgroup_parent: str  # the host's cgroup; each worker gets a child cgroup
    cfs_period_us: int = DEFAULT_CFS_PERIOD_US

    def quota(self, devices: int) -> CpuQuota:
        return CpuQuota(self.cpu_cores_per_device * devices, self.cfs_period_us)

    def kv_cache_blocks(self, devices: int, block_size: int) -> int:
        """Blocks of the engine's size that hold `devices` devices' KV tokens."""
        return -(-self.kv_cache_tokens_per_device * devices // block_size)

    def engine_env(self, devices: int, worker_id: str) -> tuple[tuple[str, str], ...]:
        """Environment for an engine on `devices` devices: as many OpenMP threads as whole cores of
        CPU time (at least one), left unbound. vLLM's default binds one thread per core of the
        machine; a 0.3-core device then spreads its GEMMs over threads that share cores with
        other devices, and each OpenMP barrier waits for a thread the quota has throttled
        (measured: decode 4x slower per token than one thread in the same quota)."""
        threads = max(1, round(self.cpu_cores_per_device * devices))
        return (("OMP_NUM_THREADS", str(threads)), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                (DEVICE_CGROUP_ENV, str(self.device_cgroup(worker_id))))

    def worker_cgroup(self, worker_id: str) -> Path:
        """The whole worker (front end, engine core, model): no quota of its own."""
        return Path(self.cgroup_parent) / worker_id

    def device_cgroup(self, worker_id: str) -> Path:
        """The model's process of the worker, in its devices' quota."""
        return self.worker_cgroup(worker_id) / "device"

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> "EmulatedDevices":
        return cls(**json.loads(Path(path).read_text()))


def emulated_devices_from_env() -> EmulatedDevices | None:
    """This node's emulated devices, or None on a node that has real ones."""
    path = os.environ.get(EMULATED_DEVICES_ENV)
    return EmulatedDevices.read(Path(path)) if path else None
