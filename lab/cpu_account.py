"""Where the machine's CPU went while the lab served: devices, their hosts' work, everything else.

The lab emulates a device by a CPU quota on the process that runs the model
(`<host cgroup>/<worker>/device`); the worker's front end and engine core run
in `<host cgroup>/<worker>` without a quota, as a GPU node's host processes
run on its CPUs. All of it, the router, the load generator and Ray share the
machine's cores. A device can only be as fast as its profile if it gets its
quota, and its steps only start on time if its host work gets CPU too: this
module takes two snapshots (before and after a measurement) and says, in
cores, what each part used between them, how much of each device's quota
that was, how long each part's threads waited to run (per wall second: the
scheduler's run delay, throttled periods included), and how busy the
machine was.

Per-process times come from /proc/<pid>/stat (every thread's user and system
time, in clock ticks); a process that exited between the snapshots is not
counted, which is why the load generator, started once per measurement, is
in "everything else": the machine's busy time less the workers' and the
named processes' (the router, which serves every rate of a plan).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cpu_cgroup import cgroup_pids, read_quota, throttled_s

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # exited meanwhile
        return 0.0
    user_ticks, system_ticks = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (user_ticks + system_ticks) / CLOCK_TICKS_PER_S


def _process_wait_s(pid: int) -> float:
    """Seconds the process's live threads spent runnable but not running (schedstat's run_delay):
    waiting for a core another process held, or for their cgroup's next quota period."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total_ns += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # the thread exited meanwhile
            continue
    return total_ns / 1e9


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat's first line)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    total = sum(ticks[:8])  # guest time is already inside user
    return (total - idle) / CLOCK_TICKS_PER_S, total / CLOCK_TICKS_PER_S


@dataclass(frozen=True)
class WorkerCpu:
    """One worker's cumulative CPU seconds: its model (the device) and the rest (host work);
    and the seconds each side's threads waited to run."""
    device_s: float
    host_s: float
    device_wait_s: float
    host_wait_s: float
    throttled_s: float
    quota_cores: float | None


@dataclass(frozen=True)
class Snapshot:
    wall_s: float
    machine_busy_s: float
    machine_total_s: float
    workers: dict[str, WorkerCpu] = field(default_factory=dict)  # "<host>/<worker cgroup>"
    processes: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (CPU s, wait s)


def snapshot(host_cgroups: dict[str, Path], processes: dict[str, list[int]] | None = None) -> Snapshot:
    """Cumulative times now: every worker under the hosts' cgroups, and the named processes
    (e.g. the router: {"router": [pid]})."""
    workers = {}
    for host, cgroup in host_cgroups.items():
        for worker in sorted(p for p in cgroup.glob("*") if p.is_dir()):
            device = worker / "device"
            if not device.is_dir():
                continue
            device_pids = set(cgroup_pids(device))
            host_pids = set(cgroup_pids(worker)) - device_pids
            workers[f"{host}/{worker.name}"] = WorkerCpu(
                device_s=sum(map(_process_cpu_s, device_pids)), host_s=sum(map(_process_cpu_s, host_pids)),
                device_wait_s=sum(map(_process_wait_s, device_pids)), host_wait_s=sum(map(_process_wait_s, host_pids)),
                throttled_s=throttled_s(device), quota_cores=(q.cpu_cores if (q := read_quota(device)) else None))
    named = {name: (sum(map(_process_cpu_s, pids)), sum(map(_process_wait_s, pids)))
             for name, pids in (processes or {}).items()}
    busy_s, total_s = _machine_cpu_s()
    return Snapshot(time.monotonic(), busy_s, total_s, workers, named)


def usage(before: Snapshot, after: Snapshot) -> dict:
    """Cores used between the snapshots (CPU seconds per wall second), per worker and in all.

    A worker or named process present in only one snapshot (started or stopped between them) is
    left out; "other" is the machine's busy time less the workers' and the named processes'."""
    wall_s = after.wall_s - before.wall_s
    if wall_s <= 0:
        raise ValueError("the second snapshot must come after the first")
    cores = after.machine_total_s - before.machine_total_s
    machine_cores = cores / wall_s if cores > 0 else 0.0
    workers = {}
    for key in sorted(before.workers.keys() & after.workers.keys()):
        a, b = before.workers[key], after.workers[key]
        device = (b.device_s - a.device_s) / wall_s
        workers[key] = {"device_cores": round(device, 3), "host_cores": round((b.host_s - a.host_s) / wall_s, 3),
                        "device_wait": round((b.device_wait_s - a.device_wait_s) / wall_s, 3),
                        "host_wait": round((b.host_wait_s - a.host_wait_s) / wall_s, 3),
                        "quota_cores": b.quota_cores,
                        "quota_used": round(device / b.quota_cores, 3) if b.quota_cores else None,
                        "throttled_share": round((b.throttled_s - a.throttled_s) / wall_s, 3)}
    processes = {name: {"cores": round((after.processes[name][0] - before.processes[name][0]) / wall_s, 3),
                        "wait": round((after.processes[name][1] - before.processes[name][1]) / wall_s, 3)}
                 for name in sorted(before.processes.keys() & after.processes.keys())}
    busy = (after.machine_busy_s - before.machine_busy_s) / wall_s
    device_total = sum(w["device_cores"] for w in workers.values())
    host_total = sum(w["host_cores"] for w in workers.values())
    named_total = sum(p["cores"] for p in processes.values())
    return {"wall_s": round(wall_s, 1), "machine_cores": round(machine_cores, 2), "busy_cores": round(busy, 3),
            "device_cores": round(device_total, 3), "worker_host_cores": round(host_total, 3),
            "other_cores": round(busy - device_total - host_total - named_total, 3), "workers": workers,
            "processes": processes}
