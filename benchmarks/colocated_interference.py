"""What a prompt costs a colocated engine's running requests: vLLM's mixed steps, measured.

A colocated engine (vLLM without disaggregation) computes a new prompt in the
same step as one token for each running request. The planner and simulator
charge that step as the prompt's prefill plus a decode step of the running
batch (planner.sim.simulator, `_start_step`). This measures, on the tiny
model on CPU, inside an emulated device's quota (the lab's device types by
default), the step that holds a new prompt of P tokens beside B running
requests, and the two parts alone:

    mixed(B, P)    the step that holds both
    decode(B)      a step of the B running requests alone (just before)
    prefill(P)     the prompt alone on an idle engine

and reports mixed / (decode + prefill): 1.0 where the simulator's sum holds.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so each
`step()` is one scheduler step, timed from its start to its outputs; the
whole process sits in a cgroup of the device's CPU quota (root; without root
the quota is left out, the run says so, and the table's cores read None).

    .venv/bin/python -m benchmarks.colocated_interference   # hetero4's FAST (0.6) and SLOW (0.3 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results_files import write_results

LAB = Path(__file__).resolve().parent.parent / "configs" / "lab" / "hetero4.json"  # its device types' quotas
BATCHES = (0, 4, 8, 16, 24)
PROMPTS = (128, 384, 768)
CONTEXT_TOKENS = 256  # the running requests' prompts
REPEATS = 3
DECODE_STEPS = 6


def _prompt(tokens: int, seed: int) -> dict:
    # Distinct tokens per request: no prefix-cache hit shortens a prompt.
    return {"prompt_token_ids": [(seed * 7919 + 31 * i) % 500 + 3 for i in range(tokens)]}


class Probe:
    """One in-process engine, driven step by step."""

    def __init__(self) -> None:
        from vllm import LLM, SamplingParams

        from engine.config import tiny_model_settings

        settings = tiny_model_settings(max_num_seqs=64, enable_prefix_caching=False)
        settings.apply_process_env()
        self.engine = LLM(**settings.engine_kwargs()).llm_engine
        self.params = SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)
        self.next_id = 0

    def add(self, tokens: int) -> str:
        self.next_id += 1
        request_id = f"r{self.next_id}"
        self.engine.add_request(request_id, _prompt(tokens, self.next_id), self.params)
        return request_id

    def step_s(self) -> float:
        started = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - started

    def clear(self) -> None:
        self.engine.abort_request([f"r{i}" for i in range(1, self.next_id + 1)])
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def point(self, batch: int, prompt_tokens: int) -> dict:
        """decode(batch), then the step that adds a prompt of prompt_tokens (ms)."""
        for _ in range(batch):
            self.add(CONTEXT_TOKENS)
        for _ in range(3 if batch else 0):  # their prompts, then steady decode
            self.step_s()
        decode = [self.step_s() for _ in range(DECODE_STEPS)] if batch else [0.0]
        self.add(prompt_tokens)
        mixed = self.step_s()
        self.clear()
        return {"decode_ms": statistics.median(decode) * 1e3, "mixed_ms": mixed * 1e3}


def run_probe() -> dict:
    probe = Probe()
    probe.point(4, 128)  # warm up
    points = []
    for prompt_tokens in PROMPTS:
        for batch in BATCHES:
            runs = [probe.point(batch, prompt_tokens) for _ in range(REPEATS)]
            points.append({"batch": batch, "prompt_tokens": prompt_tokens,
                           "decode_ms": statistics.median(r["decode_ms"] for r in runs),
                           "mixed_ms": statistics.median(r["mixed_ms"] for r in runs)})
    return {"context_tokens": CONTEXT_TOKENS, "points": points}


def with_ratios(points: list[dict]) -> list[dict]:
    """Each point with prefill(P) (the batch-0 point of its prompt) and mixed / (decode + prefill)."""
    alone = {p["prompt_tokens"]: p["mixed_ms"] for p in points if p["batch"] == 0}
    out = []
    for p in points:
        prefill = alone[p["prompt_tokens"]]
        out.append({**p, "prefill_ms": prefill, "ratio": p["mixed_ms"] / (p["decode_ms"] + prefill)})
    return out


def measure_device(name: str, cores: float) -> dict:
    """The probe in a child process, in a cgroup of `cores` CPU time when this runs as root."""
    from common.cpu_cgroup import CPU_CONTROLLER_ROOT, CpuQuota, join_command, make_cgroup, remove_cgroup
    from common.emulated_device import DEVICE_CGROUP_ENV

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind")
    command = [sys.executable, "-m", "benchmarks.colocated_interference", "--probe"]
    cgroup = None
    if os.geteuid() != 0:
        print(f"{name}: not root, so no cgroup: the probe runs without the {cores:g}-core quota", file=sys.stderr)
    else:
        cgroup = make_cgroup(CPU_CONTROLLER_ROOT / f"hexserve-interference-{os.getpid()}", CpuQuota(cores))
        env[DEVICE_CGROUP_ENV] = str(cgroup)  # the model's process joins it when it loads (engine.vllm_plugin)
        command = join_command(command, cgroup)
    try:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "probe.json"
            subprocess.run([*command, "--out", str(out)], env=env, check=True, timeout=1800)
            result = json.loads(out.read_text())
    finally:
        if cgroup is not None:
            remove_cgroup(cgroup)
    return {"device": name, "cpu_cores": cores if cgroup else None, **result,
            "points": with_ratios(result["points"])}


HEADER = ["device", "running batch B", "prompt P", "decode(B) ms", "prefill(P) ms", "mixed step ms",
          "mixed / (decode + prefill)"]


def table_rows(results: list[dict]) -> list[list[str]]:
    return [[f"{device['device']} ({device['cpu_cores']} cores)", str(p["batch"]), str(p["prompt_tokens"]),
             f"{p['decode_ms']:.1f}", f"{p['prefill_ms']:.1f}", f"{p['mixed_ms']:.1f}", f"{p['ratio']:.2f}"]
            for device in results for p in device["points"] if p["batch"] > 0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the child, in its cgroup
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="colocated_interference")
    args = parser.parse_args(argv)
    if args.probe:
        args.out.write_text(json.dumps(run_probe()))
        return
    from lab.spec import load_lab

    devices = load_lab(LAB).device_types
    results = [measure_device(name, device.cpu_cores) for name, device in devices.items()]
    write_results(args.name, {"devices": results}, HEADER, table_rows(results))


if __name__ == "__main__":
    main()
