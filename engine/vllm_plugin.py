"""A vLLM general plugin (loaded by vLLM in every engine process): no busy-waiting on shared CPUs.

vLLM's engine core and its model worker hand work to each other through a
shared-memory queue whose reader spins (`sched_yield`) for a second after
every message (`SpinCondition.busy_loop_s = 1`). With a GPU and spare cores
that saves microseconds. On a CPU machine running several engines, the
spinning readers take the cores the model needs: two spinning engines on two
cores made each decode step several times slower here.

With `HEXSERVE_VLLM_SPIN_SLEEP_S` set (the workers set it on CPU), a reader
inside its busy-wait window sleeps that long instead of yielding: it still
sees new work within a fraction of a millisecond, but leaves the cores to
the model. Outside the window vLLM's own wait (a ZeroMQ notification) is
unchanged. (Waiting on the notification alone, with no busy window, lost
wake-ups here and stalled steps for a second: that is why we sleep-poll.)
The class's `wait` is patched rather than its constructor because the worker
process builds its queues before vLLM loads plugins; `wait` is looked up at
call time, so queues built earlier follow the setting too.

Second fix, always on: vLLM's CPU model runner allocates the buffers a
later pipeline stage receives its input in (`intermediate_tensors`) only in
its compile warm-up, which eager mode with an explicit KV-cache size (our
CPU default) skips, so every pipeline_parallel_size > 1 engine on CPU died on
its first step (`assert self.intermediate_tensors is not None`). We allocate
them once the model is loaded, as the GPU runner's dummy run does.

Third, on a lab's emulated device (`HEXSERVE_DEVICE_CGROUP` set, see
common.emulated_device): the process that loads the model moves itself into
the device's cgroup, so the device's CPU quota holds the model's passes and
not the front end's or the engine core's host work.

Registered in pyproject.toml under the `vllm.general_plugins` entry point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV_VAR = "HEXSERVE_VLLM_SPIN_SLEEP_S"


def register() -> None:
    _patch_cpu_model_load()
    value = os.environ.get(ENV_VAR)
    if value is None:
        return
    sleep_s = float(value)
    from vllm.distributed.device_communicators import shm_broadcast

    spin = shm_broadcast.SpinCondition
    if getattr(spin.wait, "_hexserve_patched", False):
        return
    original_wait = spin.wait

    def wait(self, timeout_ms=None):
        if self.is_reader and time.monotonic() <= self.last_read + self.busy_loop_s:
            time.sleep(sleep_s)
            return
        original_wait(self, timeout_ms)

    wait._hexserve_patched = True
    spin.wait = wait


def _patch_cpu_model_load() -> None:
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a GPU build of vLLM
        return
    if getattr(CPUModelRunner.load_model, "_hexserve_patched", False):
        return
    original = CPUModelRunner.load_model

    def load_model(self, *args, **kwargs) -> None:
        _join_device_cgroup()
        original(self, *args, **kwargs)
        from vllm.distributed.parallel_state import get_pp_group

        if self.intermediate_tensors is None and not get_pp_group().is_first_rank:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device
            )

    load_model._hexserve_patched = True
    CPUModelRunner.load_model = load_model


def _join_device_cgroup() -> None:
    """Into the emulated device's cgroup, when there is one (the model's process only)."""
    from common.emulated_device import DEVICE_CGROUP_ENV

    path = os.environ.get(DEVICE_CGROUP_ENV)
    if path:
        from common.cpu_cgroup import join_cgroup

        join_cgroup(Path(path))
