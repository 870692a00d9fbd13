"""The lab's network: a namespace per host, each joined by a veth pair to a bridge.

    <lab>-h0 [eth0 10.213.7.1] ──veth── <lab>s0 ┐
    <lab>-h1 [eth0 10.213.7.2] ──veth── <lab>s1 ┼─ br0, in namespace <lab>-sw
    ...                                        ┘

The bridge lives in a namespace of its own, so nothing of the lab is
addressable from the machine's own namespace and no lab packet can leave it.
Each host's link is shaped with `tbf` on both ends of its veth (the host end
shapes what it sends, the bridge end what it receives). This kernel has no
`netem`, so links get bandwidth but no added delay: a link's latency is the
veth's own (tens of microseconds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

from common.stop_processes import stop_all
from lab.spec import Host, LabSpec

HOST_INTERFACE = "eth0"
BRIDGE = "br0"
# veths carry jumbo frames: the KV stream's per-packet CPU cost is the lab's bottleneck otherwise.
MTU = 9000


class LabNetworkError(RuntimeError):
    pass


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabNetworkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def run_tc(namespace: str, *args: str) -> None:
    proc = subprocess.run(exec_in(namespace, ["tc", *args]), capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabNetworkError(f"`tc {' '.join(args)}` in {namespace} failed: {proc.stderr.strip()}")


def host_namespace(lab: LabSpec, host: Host) -> str:
    return f"{lab.name}-{host.name}"


def switch_namespace(lab: LabSpec) -> str:
    return f"{lab.name}-sw"


def lab_namespaces(lab_name: str) -> list[str]:
    """Namespaces that exist now and belong to a lab of this name."""
    out = run_ip("netns", "list").stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{lab_name}-")]


def tbf_args(mbit_per_s: float) -> list[str]:
    """tbf for a link of this rate: a bucket of 5 ms of traffic (at least a few jumbo frames)."""
    rate_bytes_per_s = mbit_per_s * 1e6 / 8
    burst_bytes = max(4 * MTU, int(rate_bytes_per_s * 0.005))
    return ["rate", f"{mbit_per_s:g}mbit", "burst", str(burst_bytes), "latency", "100ms"]


def shape(namespace: str, interface: str, mbit_per_s: float) -> None:
    run_tc(namespace, "qdisc", "replace", "dev", interface, "root", "tbf", *tbf_args(mbit_per_s))


def create_network(lab: LabSpec) -> None:
    """Namespaces, bridge, veths, addresses and shaping. The caller tears down on failure."""
    switch = switch_namespace(lab)
    run_ip("netns", "add", switch)
    run_ip("-n", switch, "link", "set", "lo", "up")
    run_ip("-n", switch, "link", "add", BRIDGE, "type", "bridge")
    run_ip("-n", switch, "link", "set", BRIDGE, "up")
    for i, host in enumerate(lab.hosts):
        namespace, host_end, switch_end = host_namespace(lab, host), f"{lab.name}h{i}", f"{lab.name}s{i}"
        run_ip("netns", "add", namespace)
        run_ip("-n", namespace, "link", "set", "lo", "up")
        run_ip("link", "add", host_end, "mtu", str(MTU), "type", "veth", "peer", "name", switch_end, "mtu", str(MTU))
        run_ip("link", "set", host_end, "netns", namespace)
        run_ip("link", "set", switch_end, "netns", switch)
        run_ip("-n", namespace, "link", "set", host_end, "name", HOST_INTERFACE)
        run_ip("-n", namespace, "addr", "add", f"{host.address}/{lab.subnet.prefixlen}", "dev", HOST_INTERFACE)
        run_ip("-n", namespace, "link", "set", HOST_INTERFACE, "up")
        run_ip("-n", switch, "link", "set", switch_end, "master", BRIDGE)
        run_ip("-n", switch, "link", "set", switch_end, "up")
        shape(namespace, HOST_INTERFACE, host.link_mbit_per_s)
        shape(switch, switch_end, host.link_mbit_per_s)


def namespace_pids(namespace: str) -> list[int]:
    out = run_ip("netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split()]


def kill_namespace_processes(namespace: str, timeout_s: float = 15.0) -> None:
    """Every process in the namespace (Ray's daemons, workers, a router), TERM then KILL."""
    left = stop_all(lambda: namespace_pids(namespace), timeout_s, poll_s=0.3)
    if left:
        raise LabNetworkError(f"processes {left} in namespace {namespace} did not exit")


def remove_network(lab_name: str) -> list[str]:
    """Kill what runs in the lab's namespaces and delete them (their veths go with them). Idempotent."""
    removed = []
    for namespace in lab_namespaces(lab_name):
        kill_namespace_processes(namespace)
        run_ip("netns", "del", namespace)
        removed.append(namespace)
    # A veth left in this namespace by a start that failed before moving it: <lab>h<i> or <lab>s<i>.
    leftover = re.compile(rf"^{re.escape(lab_name)}[hs]\d+$")
    for interface in os.listdir("/sys/class/net"):
        if leftover.match(interface):
            run_ip("link", "del", interface, check=False)
    return removed


def interface_bytes(namespace: str, interface: str = HOST_INTERFACE) -> dict[str, int]:
    """The interface's counters: {"rx_bytes": .., "tx_bytes": ..}."""
    out = run_ip("-j", "-s", "-n", namespace, "link", "show", "dev", interface).stdout
    stats = json.loads(out)[0]["stats64"]
    return {"rx_bytes": int(stats["rx"]["bytes"]), "tx_bytes": int(stats["tx"]["bytes"])}


def exec_in(namespace: str, command: list[str]) -> list[str]:
    """`command`, run inside the namespace's network.

    nsenter enters the network namespace only; `ip netns exec` would also
    remount /sys for it, which hides /sys/fs/cgroup from the workers that
    must join their device cgroups."""
    return ["nsenter", f"--net=/run/netns/{namespace}", "--", *command]
