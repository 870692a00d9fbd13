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

# What the profiles must cover is what the plans will run: prompts up to the longest replayed, decode
# after a short, a middle and that longest prompt, and batches up to what a fast device's KV holds.
# Two contexts tell a step's per-request cost from its KV reads (one context read the per-request cost
# as KV and made the simulated TPOT 2-3x the measured one). Profiles that stopped at 512-token prompts,
# 272-token contexts and batch 16 fitted a decode step that barely grew with the batch: at batch 24 and
# 528-token contexts the fast device's step measured alone was 38.8 ms, 1.26x that extrapolation (hetero4,
# 2026-12-07), and at the trace's batches (20-30) and contexts (430-900) the lab's decode served about
# half the capacity the planner gave it.
PROFILE_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32)
LONGEST_PROFILED_PROMPT = 960  # the lab engine's 1024-token window, less the profile's 32 decode tokens and slack


def profile_args(max_prompt_tokens: int = 768) -> tuple[str, ...]:
    """`planner profile` options that cover prompts of up to `max_prompt_tokens` (the workload's longest)."""
    longest = min(max_prompt_tokens, LONGEST_PROFILED_PROMPT)
    prompts = sorted({n for n in (16, 64, 128, 256, 512) if n < longest} | {longest})
    contexts = sorted({n for n in (32, 256) if n < longest} | {longest})
    return ("--prompt-lengths", ",".join(map(str, prompts)), "--batch-sizes", ",".join(map(str, PROFILE_BATCH_SIZES)),
            "--decode-prompt-lengths", ",".join(map(str, contexts)))


DEFAULT_PROFILE_ARGS = profile_args()


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
