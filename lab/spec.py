"""lab.json: the emulated fleet (hosts, device types, links), parsed and checked.

```json
{"schema": "hexserve.lab", "name": "hx4", "subnet": "10.213.7.0/24",
 "device_types": {"FAST": {"cpu_cores": 0.6, "kv_cache_tokens": 16384, "price_per_hour": 1.0},
                  "SLOW": {"cpu_cores": 0.2, "kv_cache_tokens": 8192, "price_per_hour": 0.3}},
 "hosts": [{"name": "h0", "gpu_type": "FAST", "num_devices": 1, "link_mbit_per_s": 10000},
           {"name": "h1", "gpu_type": "SLOW", "num_devices": 1, "link_mbit_per_s": 200}],
 "profiles": {"FAST": "profiles/FAST.json"}}
```

A host is a network namespace with one device type (as a real node holds one
GPU type), its link is shaped both ways at `link_mbit_per_s`, and two hosts
talk at the slower of their two links. Names become Linux names (namespace,
interface), hence the short lowercase rule. `max_pipeline_stages` (default 1)
lets the planner give a group pipeline stages on several hosts.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from planner.spec.errors import PlanInputError
from planner.spec.fields import Fields, read_json_file

LAB_SCHEMA = "hexserve.lab"
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # veth names are <lab>s<i>: at most 15 characters
HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
DEFAULT_SUBNET = "10.213.7.0/24"
# CPU the lab leaves outside every device: the router, Ray's daemons and the load generator run there.
RESERVED_CPU_CORES = 0.5


@dataclass(frozen=True, slots=True)
class DeviceType:
    name: str
    cpu_cores: float  # CPU time one device gets (its cgroup quota)
    kv_cache_tokens: int  # KV-cache tokens one device holds (its memory)
    price_per_hour: float


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    gpu_type: str
    num_devices: int
    link_mbit_per_s: float
    address: str  # on the lab's subnet


@dataclass(frozen=True, slots=True)
class LabSpec:
    name: str
    subnet: ipaddress.IPv4Network
    device_types: dict[str, DeviceType]
    hosts: tuple[Host, ...]
    profiles: dict[str, Path]  # device type -> profile file (planner profile), when measured
    source: Path | None = None
    # Pipeline stages the planner may give a group; above 1 a group may span hosts (router.host_span).
    max_pipeline_stages: int = 1

    @property
    def head(self) -> Host:
        return self.hosts[0]

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise PlanInputError("hosts", f"no host named {name!r}; the lab has {', '.join(h.name for h in self.hosts)}")

    def device(self, host: Host) -> DeviceType:
        return self.device_types[host.gpu_type]

    def total_cpu_cores(self) -> float:
        return sum(self.device(h).cpu_cores * h.num_devices for h in self.hosts)

    def link_mbit_per_s(self, a: Host, b: Host) -> float:
        """Between two hosts, traffic crosses both hosts' links: the slower one bounds it."""
        return min(a.link_mbit_per_s, b.link_mbit_per_s)


def _device_type(name: str, f: Fields) -> DeviceType:
    f.check_keys({"cpu_cores", "kv_cache_tokens", "price_per_hour", "notes"})
    return DeviceType(name=name, cpu_cores=f.number("cpu_cores", above=0, maximum=256),
                      kv_cache_tokens=f.integer("kv_cache_tokens", minimum=256),
                      price_per_hour=f.number("price_per_hour", minimum=0))


def _hosts(f: Fields, types: dict[str, DeviceType], subnet: ipaddress.IPv4Network) -> tuple[Host, ...]:
    addresses = list(subnet.hosts())
    hosts: list[Host] = []
    for i, (path, raw) in enumerate(f.items("hosts", min_items=1)):
        h = Fields(raw, path)
        h.check_keys({"name", "gpu_type", "num_devices", "link_mbit_per_s", "notes"})
        name = h.string("name")
        if not HOST_NAME_RE.match(name):
            raise PlanInputError(h.at("name"), f"{name!r}: use 1-10 lowercase letters and digits, starting with a letter")
        if any(other.name == name for other in hosts):
            raise PlanInputError(h.at("name"), f"host name {name!r} is used twice")
        gpu_type = h.string("gpu_type", choices=types)
        if i >= len(addresses):
            raise PlanInputError("subnet", f"{subnet} has room for {len(addresses)} hosts; give a larger one")
        hosts.append(Host(name=name, gpu_type=gpu_type, num_devices=h.integer("num_devices", 1, minimum=1, maximum=16),
                          link_mbit_per_s=h.number("link_mbit_per_s", 10_000, above=0, maximum=1_000_000),
                          address=str(addresses[i])))
    return tuple(hosts)


def parse_lab(data: object, base_dir: Path = Path("."), source: Path | None = None) -> LabSpec:
    f = Fields(data, "")
    f.check_keys({"schema", "name", "subnet", "device_types", "hosts", "profiles", "max_pipeline_stages", "notes"})
    if f.has("schema") and f.string("schema") != LAB_SCHEMA:
        raise PlanInputError("schema", f"must be {LAB_SCHEMA!r} (is this a cluster file? use `python -m planner`)")
    name = f.string("name")
    if not LAB_NAME_RE.match(name):
        raise PlanInputError("name", f"{name!r}: use 1-8 lowercase letters and digits, starting with a letter")
    try:
        subnet = ipaddress.IPv4Network(f.string("subnet", DEFAULT_SUBNET))
    except ValueError as exc:
        raise PlanInputError("subnet", f"{exc}; give a private IPv4 network such as {DEFAULT_SUBNET}") from None
    if not subnet.is_private:
        raise PlanInputError("subnet", f"{subnet} is not private; the lab's addresses must not leave the machine")
    types_f = f.obj("device_types")
    types = {t: _device_type(t, types_f.obj(t)) for t in types_f.data}
    if not types:
        raise PlanInputError("device_types", "give at least one device type")
    hosts = _hosts(f, types, subnet)
    profiles_f = f.obj("profiles", {})
    profiles = {t: base_dir / profiles_f.string(t) for t in profiles_f.data}
    for t in profiles:
        if t not in types:
            raise PlanInputError(f"profiles.{t}", f"no device type {t!r}; the lab has {', '.join(sorted(types))}")
    lab = LabSpec(name=name, subnet=subnet, device_types=types, hosts=hosts, profiles=profiles, source=source,
                  max_pipeline_stages=f.integer("max_pipeline_stages", 1, minimum=1, maximum=8))
    available = (os.cpu_count() or 1) - RESERVED_CPU_CORES
    if lab.total_cpu_cores() > available + 1e-9:
        raise PlanInputError("device_types", f"the devices take {lab.total_cpu_cores():g} cores; this machine "
                             f"has {os.cpu_count()} and the lab keeps {RESERVED_CPU_CORES:g} for the router, Ray "
                             f"and the load generator: lower cpu_cores or num_devices")
    return lab


def load_lab(path: Path | str) -> LabSpec:
    path = Path(path)
    return parse_lab(read_json_file(path, what="lab file"), path.parent, source=path.resolve())
