"""A real Ray node in each lab host: the head in the first, the others joining it.

Each node advertises its devices as the custom resource `gpu_type:<T>` (what
the Ray launcher asks for when it places a plan's group) and its name as
`hexserve_node:<host>` (so a group lands on the host the plan chose) and is started with
`$HEXSERVE_EMULATED_DEVICES` naming the host's device file, which every Ray
worker process on the node inherits: a group's actor reads it to put its
worker in a cgroup of its devices' CPU time (common.emulated_device).
Ray's own daemons stay outside the device cgroups, on the CPU the lab keeps
back, as a GPU node's daemons run on its host CPU and not on its GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common.emulated_device import EMULATED_DEVICES_ENV
from common.ray_resources import NODE_RESOURCE_AMOUNT, gpu_type_resource, node_resource
from lab.network import exec_in, host_namespace
from lab.spec import Host, LabSpec

RAY_PORT = 6379
# Ray's default object store is 30 % of memory per node; the lab's nodes move
# only small actor messages, and five defaults would claim most of /dev/shm.
OBJECT_STORE_BYTES = 100 * 1024 * 1024


class RayStartError(RuntimeError):
    pass


def ray_address(lab: LabSpec) -> str:
    return f"{lab.head.address}:{RAY_PORT}"


def _ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def node_resources(lab: LabSpec, host: Host) -> dict[str, float]:
    return {gpu_type_resource(host.gpu_type): float(host.num_devices), node_resource(host.name): NODE_RESOURCE_AMOUNT}


def start_node(lab: LabSpec, host: Host, devices_file: Path, temp_dir: Path, log_file: Path) -> None:
    head = host is lab.head
    command = [_ray_executable(), "start", "--node-ip-address", host.address,
               # A bundle of the Ray launcher's placement groups asks for 1 CPU per device type.
               "--num-cpus", str(host.num_devices + 1), "--num-gpus", "0",
               "--resources", json.dumps(node_resources(lab, host)),
               "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
    if head:
        command += ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false", "--temp-dir", str(temp_dir)]
    else:
        command += ["--address", ray_address(lab)]
    env = dict(os.environ, **{EMULATED_DEVICES_ENV: str(devices_file), "RAY_USAGE_STATS_ENABLED": "0"})
    with open(log_file, "ab") as log:
        proc = subprocess.run(exec_in(host_namespace(lab, host), command), env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=180)
    if proc.returncode != 0:
        raise RayStartError(f"`ray start` on lab host {host.name} failed (exit {proc.returncode}); see {log_file}")
