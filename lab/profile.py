"""`python -m lab profile lab.json`: measure each device type on the lab, inside its cgroup.

For each device type, the planner plans the first host of that type alone in
colocated mode (one worker on one device), the router serves that plan on
the lab (the worker is a Ray actor on that host, in its device cgroup), and
`python -m planner profile` measures it from the head host through the
router, as the lab's plans will be served. The profiles go to a folder; the
lab file's `profiles` names them, and the cluster file then calibrates each
type on its own measurements.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from common.ports import free_tcp_port
from lab.cluster_file import LAB_MODEL_PRESET, write_cluster_file
from lab.serving import run_in_head, serve_plan
from lab.spec import LabSpec

# Prompts up to half the tiny model's window, and decode batches past a slow device's KV limit, after a
# short and a long prompt: two contexts tell a step's per-request cost from its KV reads (one context read
# the per-request cost as KV and made the simulated TPOT 2-3x the measured one at the trace's contexts).
DEFAULT_PROFILE_ARGS = ("--prompt-lengths", "16,64,128,256,512", "--batch-sizes", "1,2,4,8,16",
                        "--decode-prompt-lengths", "32,256")


def profile_device_types(lab: LabSpec, state: dict, out_dir: Path,
                         profile_args: tuple[str, ...] = DEFAULT_PROFILE_ARGS) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for gpu_type in sorted(lab.device_types):
        host = next(h for h in lab.hosts if h.gpu_type == gpu_type)
        alone = dataclasses.replace(lab, hosts=(dataclasses.replace(host, num_devices=1),), profiles={})
        cluster = write_cluster_file(alone, out_dir / f"{gpu_type}.cluster.json")
        plan = out_dir / f"{gpu_type}.plan.json"
        subprocess.run([sys.executable, "-m", "planner", "solve", str(cluster), "--mode", "colocated",
                        "--out", str(plan), "--quiet"], check=True, timeout=300)
        profile = out_dir / f"{gpu_type}.json"
        with serve_plan(state, plan, free_tcp_port(), out_dir / f"{gpu_type}.router.log") as url:
            run_in_head(state, [sys.executable, "-m", "planner", "profile", "--url", url, "--gpu-type", gpu_type,
                                "--preset", LAB_MODEL_PRESET, "--out", str(profile), "--cluster", str(cluster),
                                *profile_args],
                        log=out_dir / f"{gpu_type}.profile.log")
        profiles[gpu_type] = profile
    return profiles
