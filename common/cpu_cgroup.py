"""CPU-quota cgroups: how an emulated device gets its share of the CPU.

A device of the lab (see lab/) is a cgroup of the v1 `cpu` controller whose
CFS quota is the device's CPU time: 0.5 cores is 5 ms of CPU per 10 ms
period. The period is short on purpose: with the kernel's default 100 ms a
process that used its quota early sits throttled for the rest of the period,
which shows up as tens of milliseconds of jitter in every decode step.

A process joins a cgroup by writing its pid to `cgroup.procs`; its children
(vLLM's engine core, its own helpers) inherit it, so a worker started through
`join_command` runs wholly inside its device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.stop_processes import stop_all

CPU_CONTROLLER_ROOT = Path("/sys/fs/cgroup/cpu")
DEFAULT_CFS_PERIOD_US = 10_000


class CgroupError(RuntimeError):
    """A cgroup could not be made, changed or removed; the message says why and what to do."""


def controller_root() -> Path:
    """The mounted v1 cpu controller, or a clear refusal."""
    if not (CPU_CONTROLLER_ROOT / "cpu.cfs_quota_us").exists():
        raise CgroupError(f"no cgroup v1 cpu controller at {CPU_CONTROLLER_ROOT} (cpu.cfs_quota_us missing); "
                          "mount it (mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu) or run where it is")
    if not os.access(CPU_CONTROLLER_ROOT, os.W_OK):
        raise CgroupError(f"{CPU_CONTROLLER_ROOT} is not writable: run as root")
    return CPU_CONTROLLER_ROOT


@dataclass(frozen=True, slots=True)
class CpuQuota:
    cpu_cores: float  # CPU time per wall time; 0.5 is half a core
    period_us: int = DEFAULT_CFS_PERIOD_US

    @property
    def quota_us(self) -> int:
        return max(1000, round(self.cpu_cores * self.period_us))  # the kernel's minimum quota is 1 ms


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"could not write {value!r} to {path}: {exc.strerror}") from None


def make_cgroup(path: Path, quota: CpuQuota | None = None) -> Path:
    """Create the cgroup (and its parents); with a quota, limit it. Idempotent."""
    controller_root()
    path.mkdir(parents=True, exist_ok=True)
    if quota is not None:
        # Period first: a quota longer than the old period may be refused under a parent's limit.
        _write(path / "cpu.cfs_period_us", str(quota.period_us))
        _write(path / "cpu.cfs_quota_us", str(quota.quota_us))
    return path


def read_quota(path: Path) -> CpuQuota | None:
    quota_us = int((path / "cpu.cfs_quota_us").read_text())
    if quota_us < 0:
        return None
    period_us = int((path / "cpu.cfs_period_us").read_text())
    return CpuQuota(quota_us / period_us, period_us)


def throttled_s(path: Path) -> float:
    """How long the cgroup's tasks have waited for quota (cpu.stat throttled_time, seconds)."""
    for line in (path / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "throttled_time":
            return int(value) / 1e9
    return 0.0


def cgroup_pids(path: Path) -> list[int]:
    """Pids in the cgroup and every cgroup below it."""
    pids: list[int] = []
    if not path.exists():
        return pids
    for procs in sorted(path.rglob("cgroup.procs")):
        pids += [int(p) for p in procs.read_text().split()]
    return pids


def join_cgroup(path: Path, pid: int | None = None) -> None:
    """Move process `pid` (default: this one), every thread of it, into the cgroup."""
    _write(Path(path) / "cgroup.procs", str(pid or os.getpid()))


def join_command(command: list[str], path: Path) -> list[str]:
    """`command`, run inside the cgroup: a shell joins it, then execs the command
    (so the pid, and every child, is in the cgroup before the first instruction)."""
    return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(path), *command]


def remove_cgroup(path: Path, kill_timeout_s: float = 10.0) -> None:
    """Kill whatever still runs in the cgroup tree, then remove it, deepest first. Idempotent."""
    if not path.exists():
        return
    left = stop_all(lambda: cgroup_pids(path), kill_timeout_s)
    if left:
        raise CgroupError(f"processes {left} in {path} did not exit; kill them and run again")
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        child.rmdir()
    path.rmdir()
