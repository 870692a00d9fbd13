"""Where the lab's CPU went: a device's model at its quota, its host work beside it, the machine's total."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from common.cpu_cgroup import CpuQuota, join_command, make_cgroup, remove_cgroup
from lab.cpu_account import Snapshot, WorkerCpu, snapshot, usage
from lab.launcher import LabPaths
from tests.lab.test_lab_units import needs_root

SPIN = [sys.executable, "-c", "while True: pass"]


def test_usage_is_cores_per_wall_second_and_leaves_out_workers_that_came_or_went():
    before = Snapshot(10.0, 100.0, 400.0, {"h0/w0": WorkerCpu(5.0, 1.0, 2.0, 0.0, 0.5, 0.5),
                                           "h1/gone": WorkerCpu(1.0, 1.0, 0.0, 0.0, 0.0, 0.3)})
    after = Snapshot(14.0, 106.0, 408.0, {"h0/w0": WorkerCpu(7.0, 2.0, 4.0, 0.2, 1.3, 0.5),
                                          "h2/new": WorkerCpu(9.0, 9.0, 9.0, 9.0, 9.0, 0.3)})
    used = usage(before, after)
    assert used["machine_cores"] == 2.0 and used["busy_cores"] == 1.5
    assert used["workers"] == {"h0/w0": {"device_cores": 0.5, "host_cores": 0.25, "device_wait": 0.5,
                                         "host_wait": 0.05, "quota_cores": 0.5,
                                         "quota_used": 1.0, "throttled_share": 0.2}}
    assert used["other_cores"] == pytest.approx(1.5 - 0.5 - 0.25)
    with pytest.raises(ValueError, match="after the first"):
        usage(after, before)


@needs_root
def test_a_spinning_model_uses_its_quota_and_the_host_work_beside_it_is_counted_apart():
    host = LabPaths("hxa").cgroup / "h0"
    device = make_cgroup(host / "w0" / "device", CpuQuota(0.2))
    procs = [subprocess.Popen(join_command(SPIN, device)), subprocess.Popen(join_command(["sleep", "30"], host / "w0"))]
    try:
        time.sleep(0.5)
        before = snapshot({"h0": host})
        time.sleep(2.0)
        used = usage(before, snapshot({"h0": host}))
    finally:
        remove_cgroup(LabPaths("hxa").cgroup)
    worker = used["workers"]["h0/w0"]
    assert 0.12 <= worker["device_cores"] <= 0.25, used  # held at its quota, not a whole core
    assert worker["quota_cores"] == pytest.approx(0.2) and worker["throttled_share"] > 0
    assert worker["device_wait"] > 0.5  # runnable all the time, running a fifth of it
    assert worker["host_cores"] < 0.05  # the sleeping front end
    assert used["busy_cores"] >= worker["device_cores"] - 0.02
    assert all(p.wait(timeout=10) != 0 for p in procs)
