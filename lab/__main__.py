"""`python -m lab up|down|status|profile|exec`: run the serving stack on an emulated heterogeneous fleet (as root)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from common.cpu_cgroup import CgroupError
from lab.cluster_file import write_cluster_file
from lab.launcher import LabError, down, lab_state, status, up
from lab.network import LabNetworkError, exec_in
from lab.profile import profile_device_types
from lab.ray_nodes import RayStartError
from lab.spec import LAB_NAME_RE, load_lab
from planner.spec.errors import PlanInputError

EXPECTED_ERRORS = (PlanInputError, LabError, LabNetworkError, CgroupError, RayStartError)


def _lab_name(value: str) -> str:
    """A lab file's name field, or a bare name (so `down` works when the file is gone)."""
    if LAB_NAME_RE.match(value) and not Path(value).exists():
        return value
    return load_lab(value).name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="build the lab: namespaces, shaped links, device cgroups, a Ray node per host")
    p.add_argument("lab", help="lab.json")
    p.add_argument("--cluster-out", default=None,
                   help="where to write the lab's cluster.json for the planner (default: <lab>.cluster.json beside it)")
    p = sub.add_parser("down", help="remove everything of a lab (idempotent)")
    p.add_argument("lab", help="lab.json or the lab's name")
    p = sub.add_parser("status", help="what of the lab is running")
    p.add_argument("lab", help="lab.json or the lab's name")
    p = sub.add_parser("profile", help="measure each device type (planner profile, in its cgroup, through the router)")
    p.add_argument("lab", help="lab.json (the lab must be up)")
    p.add_argument("--out-dir", default=None, help="where the profiles go (default: <lab>-profiles/ beside the lab file)")
    p = sub.add_parser("exec", help="run a command on a lab host (inside its namespace)")
    p.add_argument("lab", help="lab.json or the lab's name")
    p.add_argument("host", help="host name, e.g. h0 (the head: router and load generator run there)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    return parser


def _exec(name: str, host: str, cmd: list[str]) -> int:
    state = lab_state(name)
    namespaces = {h["name"]: h["namespace"] for h in state["hosts"]}
    if host not in namespaces:
        raise LabError(f"host: no host {host!r} in lab {name}; it has {', '.join(namespaces)}")
    cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    if not cmd:
        raise LabError("give the command after --, e.g. `python -m lab exec lab.json h0 -- ip addr`")
    command = exec_in(namespaces[host], cmd)
    os.execvp(command[0], command)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            lab = load_lab(args.lab)
            out = Path(args.cluster_out) if args.cluster_out else Path(args.lab).with_suffix(".cluster.json")
            state = up(lab, cluster_out=out)
            print(f"lab {lab.name} up: Ray at {state['ray_address']}, cluster file {state.get('cluster_file')}")
            for h in state["hosts"]:
                print(f"  {h['name']}: {h['address']} ({h['num_devices']} x {h['gpu_type']}, "
                      f"{h['link_mbit_per_s']:g} Mbit/s) namespace {h['namespace']}")
            print(f"serve a plan: python -m lab exec {args.lab} {state['hosts'][0]['name']} -- "
                  f"{sys.executable} -m router serve --plan plan.json --ray {state['ray_address']}")
        elif args.command == "down":
            removed = down(_lab_name(args.lab))
            print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")
        elif args.command == "profile":
            lab = load_lab(args.lab)
            out_dir = Path(args.out_dir) if args.out_dir else Path(args.lab).with_name(f"{lab.name}-profiles")
            state = lab_state(lab.name)
            profiles = profile_device_types(lab, state, out_dir)
            names = {t: str(p.resolve()) for t, p in profiles.items()}
            if state.get("cluster_file"):  # the running lab's cluster file now plans on the measurements
                write_cluster_file(dataclasses.replace(lab, profiles=profiles), Path(state["cluster_file"]))
            print(f"profiles written and applied to {state.get('cluster_file')}; to keep them, add to {args.lab}:\n"
                  f'  "profiles": {json.dumps(names)}')
        elif args.command == "status":
            print(json.dumps(status(_lab_name(args.lab)), indent=1))
        else:
            return _exec(_lab_name(args.lab), args.host, args.cmd)
    except EXPECTED_ERRORS as exc:
        print(f"python -m lab {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"python -m lab {args.command}: interrupted; what was started is removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
