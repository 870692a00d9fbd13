"""Bringing a lab up and down: network, device cgroups, Ray nodes, and the state that ties them.

`up` builds everything or, on any failure or Ctrl-C, tears down what it built
before re-raising; run again on a lab that is up as described, it only
writes the cluster file, and it refuses a lab of that name described
otherwise. `down` needs nothing but the lab's name: it removes every
namespace `<name>-*` (killing what runs there), the cgroup tree
`hexserve-lab-<name>`, and the lab's folders, so it also cleans a lab whose
launcher was killed. Both are idempotent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.cpu_cgroup import cgroup_pids, controller_root, make_cgroup, remove_cgroup, throttled_s
from common.emulated_device import EmulatedDevices
from lab.cluster_file import write_cluster_file
from lab.network import create_network, host_namespace, lab_namespaces, remove_network
from lab.ray_nodes import ray_address, start_node
from lab.spec import Host, LabSpec

STATE_ROOT = Path("/run/hexserve-lab")


class LabError(RuntimeError):
    """The lab cannot be brought up or used as asked; the message says what to do."""


@dataclass(frozen=True, slots=True)
class LabPaths:
    name: str

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def ray_temp_dir(self) -> Path:
        # Short: Ray's socket paths under it must fit a Unix socket name (107 bytes).
        return Path(f"/tmp/hxlab-{self.name}")

    @property
    def cgroup(self) -> Path:
        return controller_root() / f"hexserve-lab-{self.name}"

    def host_cgroup(self, host: Host) -> Path:
        return self.cgroup / host.name

    def devices_file(self, host: Host) -> Path:
        return self.state_dir / f"{host.name}.devices.json"

    def log_file(self, host: Host) -> Path:
        return self.state_dir / f"ray-{host.name}.log"


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, tc, cgroups): run it as root")


def _check_subnet_free(lab: LabSpec) -> None:
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    for link in json.loads(out):
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet" and ipaddress.IPv4Address(addr["local"]) in lab.subnet:
                raise LabError(f"subnet: {lab.subnet} is in use on this machine ({link['ifname']} has "
                               f"{addr['local']}); give the lab another private subnet")


def _start_devices(lab: LabSpec, paths: LabPaths) -> None:
    for host in lab.hosts:
        device = lab.device(host)
        # No quota on the host: its serving processes are host work; each worker's
        # model process gets its devices' quota (common.emulated_device).
        cgroup = make_cgroup(paths.host_cgroup(host))
        EmulatedDevices(gpu_type=host.gpu_type, num_devices=host.num_devices, cpu_cores_per_device=device.cpu_cores,
                        kv_cache_tokens_per_device=device.kv_cache_tokens,
                        cgroup_parent=str(cgroup)).write(paths.devices_file(host))


def _description(lab: LabSpec) -> dict:
    """What a running lab is made of (not its profiles, which only change the cluster file)."""
    return {"subnet": str(lab.subnet), "device_types": {n: asdict(d) for n, d in lab.device_types.items()},
            "hosts": [asdict(h) for h in lab.hosts]}


def _build(lab: LabSpec, paths: LabPaths) -> dict:
    """Network, device cgroups and Ray nodes; on any failure or Ctrl-C, removes what it built."""
    _check_subnet_free(lab)
    try:
        paths.state_dir.mkdir(parents=True, exist_ok=True)
        create_network(lab)
        _start_devices(lab, paths)
        for host in lab.hosts:  # the head first: the others join it
            start_node(lab, host, paths.devices_file(host), paths.ray_temp_dir, paths.log_file(host))
    except BaseException:
        down(lab.name)
        raise
    return {"name": lab.name, "lab_file": str(lab.source or ""), "ray_address": ray_address(lab),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "spec": _description(lab),
            "hosts": [{"name": h.name, "namespace": host_namespace(lab, h), "address": h.address,
                       "gpu_type": h.gpu_type, "num_devices": h.num_devices,
                       "link_mbit_per_s": h.link_mbit_per_s, "cgroup": str(paths.host_cgroup(h))}
                      for h in lab.hosts]}


def up(lab: LabSpec, cluster_out: Path | None = None) -> dict:
    """Build the lab and write its cluster file; returns its state. Already up as described: the
    running lab's state (and the cluster file written); up with another description: refused."""
    require_root()
    paths = LabPaths(lab.name)
    if paths.state_file.exists() and lab_namespaces(lab.name):
        state = json.loads(paths.state_file.read_text())
        if state.get("spec") != _description(lab):
            raise LabError(f"name: lab {lab.name!r} is up with another description (from "
                           f"{state.get('lab_file') or 'another lab file'}); `python -m lab down {lab.name}` first")
    elif lab_namespaces(lab.name) or paths.cgroup.exists():
        raise LabError(f"name: {lab.name!r} is taken (namespaces {', '.join(lab_namespaces(lab.name)) or 'none'}, "
                       f"cgroup {paths.cgroup}) but no lab of that name is recorded; `python -m lab down "
                       f"{lab.name}` removes them, or give the lab another name")
    else:
        state = _build(lab, paths)
    if cluster_out is not None:
        state["cluster_file"] = str(write_cluster_file(lab, cluster_out).resolve())
    paths.state_file.write_text(json.dumps(state, indent=1) + "\n")
    return state


def down(name: str) -> list[str]:
    """Remove everything of the lab `name`; returns what was removed."""
    require_root()
    paths = LabPaths(name)
    removed = remove_network(name)
    if paths.cgroup.exists():
        remove_cgroup(paths.cgroup)
        removed.append(str(paths.cgroup))
    for folder in (paths.state_dir, paths.ray_temp_dir):
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def status(name: str) -> dict:
    """What is running now: per host, its namespace, processes in its devices and their throttling."""
    paths = LabPaths(name)
    if not paths.state_file.exists():
        return {"name": name, "up": False, "leftovers": lab_namespaces(name)}
    state = json.loads(paths.state_file.read_text())
    live = set(lab_namespaces(name))
    for host in state["hosts"]:
        cgroup = Path(host["cgroup"])
        host["namespace_up"] = host["namespace"] in live
        host["device_pids"] = cgroup_pids(cgroup) if cgroup.exists() else []
        # The quota is on each worker's model process (<worker>/device): its throttling, summed.
        host["throttled_s"] = round(sum(throttled_s(d) for d in cgroup.glob("*/device")), 3) if cgroup.exists() else None
    state["up"] = all(h["namespace_up"] for h in state["hosts"])
    return state


def lab_state(name: str) -> dict:
    paths = LabPaths(name)
    if not paths.state_file.exists():
        raise LabError(f"no lab named {name!r} is up; start it with `python -m lab up LAB.json`")
    return json.loads(paths.state_file.read_text())
