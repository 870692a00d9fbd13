"""The heterogeneous claim, measured: our plan against three baselines on the lab (as root).

    .venv/bin/python -m benchmarks.lab_hetero                     # configs/lab/hetero4.json
    .venv/bin/python -m benchmarks.lab_hetero --rate-scales 0.05,0.1,0.15 --requests 60
    .venv/bin/python -m benchmarks.lab_hetero --trace azure-code --max-input-tokens 896 --requests 60
        --rate-scales 0.35,0.5,0.7,1,1.4 --burst-aware --name lab_hetero_code   # (one command) one burst

1. Bring the lab up (`lab.launcher.up`): one FAST and three SLOW emulated
   devices, one SLOW host behind a slow link; each a Ray node in its own
   namespace, each device a CPU-quota cgroup with its KV size.
2. Profile each device type on the lab (`lab.profile`: `planner profile`
   through the router against one worker in its cgroup) unless `--profiles`
   names a folder of earlier ones; the cluster file is calibrated on them.
3. Plan: ours and the baselines of `benchmarks.lab_plans`.
4. For each plan: a fresh router (`router serve --plan --ray`, default
   routing) in the head host, the trace (Azure conversation by default;
   `--trace`, clipped by `--max-input-tokens` / `--max-output-tokens`) replayed from the
   head host at each rate scale (the same requests for every plan), then
   `planner simulate` of the same plan and requests on the same cluster file.
5. Report, per plan and rate: throughput, goodput, SLO attainment, TTFT and
   TPOT; per plan the throughput at SLO (the highest measured throughput at a
   rate where >= 90 % of requests met both SLOs); the ratios to the best
   baseline; and the simulator's error against each measurement.

Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.lab_plans import PLAN_NAMES, write_plans
from benchmarks.lab_report import devices_used, report_markdown
from common.arrivals import gap_cv2
from common.ports import free_tcp_port
from common.traces import TraceError, load_trace
from lab.cluster_file import write_cluster_file
from lab.cpu_account import snapshot, usage
from lab.launcher import LabError, down, up
from lab.profile import profile_args, profile_device_types
from lab.serving import router_pids, run_in_head, serve_plan
from lab.spec import load_lab

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
ATTAINMENT_TARGET = 0.9
METRICS = ("request_throughput", "request_goodput", "slo_attainment", "mean_ttft_ms", "p90_ttft_ms",
           "mean_tpot_ms", "p90_tpot_ms", "completed", "failed")


@dataclasses.dataclass(frozen=True)
class Workload:
    trace: str = "azure-conv"
    start_s: float = 0.0
    requests: int = 90
    max_input_tokens: int = 768
    max_output_tokens: int = 128
    slo_ttft_ms: float = 3000.0
    slo_tpot_ms: float = 80.0
    # Give the planner the replayed requests' burstiness (read off their arrival times) instead of
    # Poisson arrivals: the code trace's first requests come in bursts (gap CV^2 ~53).
    burst_aware: bool = False

    def args(self, rate_scale: float) -> list[str]:
        return ["--trace", self.trace, "--start-s", str(self.start_s), "--max-requests", str(self.requests),
                "--rate-scale", str(rate_scale), "--max-input-tokens", str(self.max_input_tokens),
                "--max-output-tokens", str(self.max_output_tokens), "--slo-ttft-ms", str(self.slo_ttft_ms),
                "--slo-tpot-ms", str(self.slo_tpot_ms), "--no-plots"]

    def cluster_workload(self) -> dict:
        """The planner's workload: the lengths of the requests replayed (clipped as the load test clips them)."""
        requests = [r for r in load_trace(self.trace) if r.arrival_s >= self.start_s][:self.requests]
        inputs = [min(r.input_tokens, self.max_input_tokens) for r in requests]
        outputs = [min(r.output_tokens, self.max_output_tokens) for r in requests]
        workload = {"input_tokens_mean": statistics.mean(inputs), "input_tokens_std": statistics.pstdev(inputs),
                    "output_tokens_mean": statistics.mean(outputs),
                    "slo": {"ttft_ms": self.slo_ttft_ms, "tpot_ms": self.slo_tpot_ms}}
        cv2 = gap_cv2(r.arrival_s for r in requests) if self.burst_aware else None
        if cv2:  # a rate scale divides every gap alike: the same burstiness at every rate
            workload["burstiness"] = 1 / cv2
        return workload


def _summary(prefix: Path) -> dict:
    """One rate's load-test figures, and where the CPU went while it was served (lab.cpu_account)."""
    summary = json.loads(Path(f"{prefix}.json").read_text())
    result = {k: summary.get(k) for k in METRICS}
    cpu = _cpu_file(prefix)
    if cpu.exists():
        result["cpu"] = json.loads(cpu.read_text())
    return result


def _cpu_file(prefix: Path) -> Path:
    return Path(f"{prefix}.cpu.json")


def _cpu_line(cpu: dict) -> str:
    return (f"busy {cpu['busy_cores']:.2f} of {cpu['machine_cores']:.0f} cores; devices {devices_used(cpu)}; "
            f"workers' host work {cpu['worker_host_cores']:.2f}; "
            + "".join(f"{k} {p['cores']:.2f} (waiting {p['wait']:.2f}); " for k, p in cpu.get("processes", {}).items())
            + f"other {cpu['other_cores']:.2f}")


def measure(state: dict, plan: Path, workload: Workload, rate_scales: list[float], out_dir: Path, name: str,
            reuse: bool = False) -> dict:
    """Each rate against a fresh router serving `plan`. With `reuse`, a rate with a result file from
    an earlier run of the same plan is read back; only the others are served."""
    from engine.tiny_model import build_tiny_model

    host_cgroups = {host["name"]: Path(host["cgroup"]) for host in state["hosts"]}
    prefixes = {f"{scale:g}": out_dir / f"{name}.measured.{scale:g}" for scale in rate_scales}
    results = {key: _summary(prefix) for key, prefix in prefixes.items()
               if reuse and Path(f"{prefix}.json").exists()}
    missing = [scale for scale in rate_scales if f"{scale:g}" not in results]
    if missing:
        with serve_plan(state, plan, free_tcp_port(), out_dir / f"{name}.router.log") as url:
            for scale in missing:
                prefix = prefixes[f"{scale:g}"]
                processes = {"router": router_pids(state)}
                before = snapshot(host_cgroups, processes)
                run_in_head(state, [sys.executable, "-m", "loadtest", "run", "--endpoint", url, "--label", name,
                                    "--tokenizer", str(build_tiny_model()), "--no-progress", "--out", str(prefix),
                                    *workload.args(scale)], log=out_dir / f"{name}.loadtest.log", timeout_s=1800)
                cpu = usage(before, snapshot(host_cgroups, processes))
                _cpu_file(prefix).write_text(json.dumps(cpu, indent=1) + "\n")
                results[f"{scale:g}"] = _summary(prefix)
                print(f"  {name} x{scale:g} CPU: {_cpu_line(cpu)}", flush=True)
                print(f"  {name} x{scale:g}: {results[f'{scale:g}']}", flush=True)
    return {f"{scale:g}": results[f"{scale:g}"] for scale in rate_scales}


def simulate(plan: Path, cluster: Path, workload: Workload, rate_scales: list[float], out_dir: Path, name: str) -> dict:
    """`planner simulate` of the same plan and requests; a rate it cannot simulate records why."""
    results = {}
    for scale in rate_scales:
        prefix = out_dir / f"{name}.simulated.{scale:g}"
        proc = subprocess.run([sys.executable, "-m", "planner", "simulate", str(plan), "--cluster", str(cluster),
                               *workload.args(scale), "--out", str(prefix)], timeout=900,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        results[f"{scale:g}"] = _summary(prefix) if proc.returncode == 0 else {
            "error": proc.stderr.strip()[-300:]}
    return results


def throughput_at_slo(runs: dict) -> float:
    met = [r["request_throughput"] for r in runs.values() if (r.get("slo_attainment") or 0) >= ATTAINMENT_TARGET]
    return max(met, default=0.0)


def relative_error(sim: float | None, measured: float | None) -> float | None:
    if sim is None or not measured:
        return None
    return (sim - measured) / measured


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab", default=str(REPO / "configs" / "lab" / "hetero4.json"))
    ap.add_argument("--profiles", default=None, help="folder with <TYPE>.json profiles (default: measure them)")
    ap.add_argument("--rate-scales", default="0.5,1,1.5,2,2.5,3,3.5")
    ap.add_argument("--requests", type=int, default=90)
    defaults = Workload()
    ap.add_argument("--trace", default=defaults.trace, help="a trace name (azure-conv, azure-code) or path")
    ap.add_argument("--max-input-tokens", type=int, default=defaults.max_input_tokens)
    ap.add_argument("--max-output-tokens", type=int, default=defaults.max_output_tokens)
    ap.add_argument("--slo-ttft-ms", type=float, default=defaults.slo_ttft_ms)
    ap.add_argument("--slo-tpot-ms", type=float, default=defaults.slo_tpot_ms)
    ap.add_argument("--plans", default=",".join(PLAN_NAMES))
    ap.add_argument("--name", default="lab_hetero")
    ap.add_argument("--burst-aware", action="store_true",
                    help="plan for the replayed requests' burstiness (1 / CV^2 of their gaps); default: Poisson")
    ap.add_argument("--keep-up", action="store_true", help="leave the lab up afterwards")
    ap.add_argument("--reuse", action="store_true",
                    help="read back each rate measured by an earlier run of the same plan (from its files) "
                         "instead of serving it again")
    args = ap.parse_args(argv)
    for flag in ("requests", "max_input_tokens", "max_output_tokens", "slo_ttft_ms", "slo_tpot_ms"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag):g}: give a number above 0")
    try:
        rate_scales = [float(x) for x in args.rate_scales.split(",")]
    except ValueError:
        ap.error(f"--rate-scales {args.rate_scales!r}: give numbers separated by commas, e.g. 0.5,1,2")
    unknown = set(args.plans.split(",")) - set(PLAN_NAMES)
    if unknown:
        ap.error(f"--plans: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PLAN_NAMES)}")
    return args, ap, rate_scales


def main(argv: list[str] | None = None) -> int:
    args, ap, rate_scales = _parse_args(argv)
    workload = Workload(trace=args.trace, requests=args.requests, max_input_tokens=args.max_input_tokens,
                        max_output_tokens=args.max_output_tokens, slo_ttft_ms=args.slo_ttft_ms,
                        slo_tpot_ms=args.slo_tpot_ms, burst_aware=args.burst_aware)
    try:  # read before the lab comes up: a trace that is not there costs nothing
        planned_workload = workload.cluster_workload()
    except TraceError as exc:
        ap.error(f"--trace: {exc}")
    if args.burst_aware and "burstiness" not in planned_workload:  # refused, not planned as Poisson in silence
        ap.error(f"--burst-aware: the {args.requests} requests replayed have too few gaps or no spread to "
                 "measure their burstiness; replay more (--requests)")
    lab = load_lab(args.lab)
    if args.profiles:
        missing = [t for t in lab.device_types if not (Path(args.profiles) / f"{t}.json").exists()]
        if missing:
            ap.error(f"--profiles {args.profiles}: no profile for {', '.join(missing)} (<TYPE>.json, from `lab profile`)")
    work = Path(f"/tmp/hexserve-{args.name}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        state = up(lab, cluster_out=work / "cluster.json")
    except LabError as exc:  # not root, or the lab's name or subnet taken: say so, nothing was left behind
        print(f"benchmarks.lab_hetero: {exc}", file=sys.stderr)
        return 2
    try:
        if args.profiles:
            profiles = {t: Path(args.profiles) / f"{t}.json" for t in lab.device_types}
        else:
            profiles = profile_device_types(lab, state, work / "profiles", profile_args(workload.max_input_tokens))
        lab = dataclasses.replace(lab, profiles=profiles)
        cluster = write_cluster_file(lab, work / "cluster.json", planned_workload)
        plans = write_plans(lab, cluster, planned_workload, work / "plans")
        runs = {}
        for name in args.plans.split(","):
            print(f"plan {name}", flush=True)
            runs[name] = {"plan": json.loads(plans[name].read_text()),
                          "measured": measure(state, plans[name], workload, rate_scales, work, name, args.reuse)}
        for name in runs:  # after every measurement: a simulator error cannot cost one
            runs[name]["simulated"] = simulate(plans[name], cluster, workload, rate_scales, work, name)
    finally:
        if not args.keep_up:
            down(lab.name)
    result = {"lab": json.loads(Path(args.lab).read_text()), "workload": dataclasses.asdict(workload),
              "rate_scales": rate_scales, "profiles": {t: json.loads(p.read_text()) for t, p in profiles.items()},
              "runs": runs, "wall_s": round(time.time() - started)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(report(result) + "\n")
    print(report(result))
    return 0


def report(result: dict) -> str:
    return report_markdown(result, ATTAINMENT_TARGET, throughput_at_slo, relative_error)


if __name__ == "__main__":
    sys.exit(main())
