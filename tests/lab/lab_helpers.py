"""What the lab tests share: whether this machine can run a lab, and a process check."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from common.cpu_cgroup import CPU_CONTROLLER_ROOT


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, tc, cgroups)"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"the lab needs `{tool}`"
    if not (CPU_CONTROLLER_ROOT / "cpu.cfs_quota_us").exists():
        return f"the lab needs the cgroup v1 cpu controller at {CPU_CONTROLLER_ROOT}"
    return None


def running(pid: int) -> bool:
    """Still a process, not a zombie waiting for its parent (the test, for the router) to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_router(router: subprocess.Popen | None) -> None:
    """Stop a router as a user does (SIGINT): it stops its Ray actors, and they their workers,
    removing what each left on the machine; `down` alone would kill them where they stand."""
    if router is None or router.poll() is not None:
        return
    router.send_signal(signal.SIGINT)
    try:
        router.wait(timeout=90)
    except subprocess.TimeoutExpired:
        router.kill()
        router.wait()


def assert_nothing_left(lab_name: str, removed: list[str], lab_pids: list[int]) -> None:
    """`down` removed the lab, and nothing of it is left: namespaces, cgroups, state, processes."""
    from lab.launcher import LabPaths
    from lab.network import lab_namespaces

    assert removed and not lab_namespaces(lab_name)
    assert not LabPaths(lab_name).cgroup.exists() and not LabPaths(lab_name).state_dir.exists()
    assert [pid for pid in lab_pids if running(pid)] == []
