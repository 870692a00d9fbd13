"""Elastic vs static on real engines: a shifting workload on the lab (as root).

    .venv/bin/python -m benchmarks.lab_elastic --profiles /path/to/profiles   # ~20 min

1. The lab `configs/lab/elastic4.json`: one FAST and three SLOW emulated
   devices (CPU-quota cgroups with their KV sizes), each a Ray node in its own
   network namespace, all on fast links. Each device type is profiled
   (`lab profile`) unless `--profiles` names a folder of earlier ones.
2. A shifting trace (Mooncake JSONL, no shared prefixes) of two phases: the
   Azure conversation trace's lengths at 2.5 req/s, then the code trace's
   (long prompts, short answers) at 5 req/s, each clipped to the tiny
   model's window, Poisson arrivals. Conversation first because here the
   SLOW devices decode poorly (0.3 cores hold TPOT <= 80 ms only at small
   batches) but prefill well: the shift where flips can pay is decode ->
   prefill (`--code-first` runs the other order).
3. The static plan: `planner solve` for the first phase (the workload known
   at start), on the calibrated cluster file.
4. Arms, each a fresh router (`router serve --plan --ray`, default routing)
   and the same requests replayed by `loadtest run` from the head host:
   - static: the plan for the first phase, kept;
   - elastic: the same plan, the router started with `--flexible-roles`, and
     `python -m planner control` beside it (an interval of 5 s, 20 s between
     actions, 15 requests in the window; the rest its defaults);
   - static, hindsight: the plan for the second phase (the plan one would
     make knowing the shift).
5. The same requests and plans simulated (`planner.sim.elastic`, static and
   with the same controller on the simulated clock) on the same cluster file.

Per arm and phase: goodput (requests meeting both SLOs per second of the
phase), SLO attainment, TTFT/TPOT p90, failures; the controller's actions.
Writes benchmarks/results/lab_elastic.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.plan import load_plan
from common.ports import free_tcp_port
from common.traces import load_trace
from lab.cluster_file import write_cluster_file
from lab.launcher import LabError, down, up
from lab.network import exec_in
from lab.profile import profile_device_types
from lab.serving import run_in_head, serve_plan
from lab.spec import load_lab

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
MAX_INPUT, MAX_OUTPUT = 768, 128  # the tiny model's 1024-token window
SLO_TTFT_MS, SLO_TPOT_MS = 3000.0, 80.0
CONTROL_ARGS = ("--interval-s", "5", "--min-interval-s", "20", "--min-requests", "15")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    trace: str
    rate_rps: float
    seconds: float

    def lengths(self) -> list[tuple[int, int]]:
        return [(min(r.input_tokens, MAX_INPUT), max(1, min(r.output_tokens, MAX_OUTPUT)))
                for r in load_trace(self.trace)]


def write_trace(phases: list[Phase], path: Path, seed: int = 0) -> list[dict]:
    """The shifting trace as Mooncake JSONL (ms timestamps); returns its rows."""
    rng, rows, start = random.Random(seed), [], 0.0
    for phase in phases:
        lengths, t, k = phase.lengths(), start, 0
        while (t := t + rng.expovariate(phase.rate_rps)) < start + phase.seconds:
            prompt, output = lengths[k % len(lengths)]
            rows.append({"timestamp": round(t * 1000, 3), "input_length": prompt, "output_length": output})
            k += 1
        start += phase.seconds
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def phase_workload(phase: Phase, n: int = 300) -> dict:
    """The planner's workload for a phase: its clipped lengths (first n requests) and the SLOs."""
    lengths = phase.lengths()[:n]
    inputs, outputs = [p for p, _ in lengths], [o for _, o in lengths]
    return {"input_tokens_mean": statistics.mean(inputs), "input_tokens_std": statistics.pstdev(inputs),
            "output_tokens_mean": statistics.mean(outputs), "arrival_rate_rps": phase.rate_rps,
            "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS}}


def plan_for(lab, phase: Phase, out_dir: Path) -> tuple[Path, Path]:
    cluster = write_cluster_file(lab, out_dir / f"{phase.name}.cluster.json", phase_workload(phase))
    plan = out_dir / f"{phase.name}.plan.json"
    subprocess.run([sys.executable, "-m", "planner", "solve", str(cluster), "--mode", "disaggregated",
                    "--out", str(plan), "--quiet"], check=True, timeout=300)
    return cluster, plan


def _p90_ms(seconds: list[float]) -> float | None:
    """The nearest-rank 90th percentile of `seconds`, in ms (None for none)."""
    return round(1e3 * sorted(seconds)[int(0.9 * (len(seconds) - 1))], 1) if seconds else None


def _requests(result: dict) -> list[tuple[float, float | None, float | None]]:
    """(seconds since the first request was sent, TTFT s, TPOT s) per request, the latencies None for a
    failed one, from the load test's per-request arrays."""
    starts = result["start_times"]
    t0 = min(starts) if starts else 0.0
    return [(start - t0, None, None) if err else (start - t0, ttft, (lat - ttft) / (out - 1) if out > 1 else 0.0)
            for start, ttft, lat, out, err in zip(starts, result["ttfts"], result["latencies"],
                                                  result["output_lens"], result["errors"])]


def per_phase(result: dict, phases: list[Phase]) -> list[dict]:
    """Goodput, attainment, p90 TTFT/TPOT and failures per phase."""
    rows, start = [], 0.0
    requests = _requests(result)
    for phase in phases + [Phase("all", "", 0.0, sum(p.seconds for p in phases))]:
        lo, hi = (0.0, phase.seconds) if phase.name == "all" else (start, start + phase.seconds)
        part = [r for r in requests if lo <= r[0] < hi]
        ok = [(ttft, tpot) for _, ttft, tpot in part if ttft is not None]
        met = sum(ttft * 1e3 <= SLO_TTFT_MS and tpot * 1e3 <= SLO_TPOT_MS for ttft, tpot in ok)
        rows.append({"phase": phase.name, "requests": len(part), "goodput_rps": round(met / phase.seconds, 3),
                     "slo_attainment": round(met / len(part), 4) if part else None,
                     "failed": len(part) - len(ok), "p90_ttft_ms": _p90_ms([t for t, _ in ok]),
                     "p90_tpot_ms": _p90_ms([t for _, t in ok])})
        if phase.name != "all":
            start += phase.seconds
    return rows


def run_arm(state: dict, name: str, plan: Path, cluster: Path, trace: Path, num_requests: int, out_dir: Path,
            elastic: bool) -> dict:
    """One router, the trace replayed; with `elastic`, flexible workers and the controller beside it."""
    from engine.tiny_model import build_tiny_model

    prefix = out_dir / f"{name}.measured"
    extra = ("--flexible-roles",) if elastic else ()
    decisions: list[dict] = []
    with serve_plan(state, plan, free_tcp_port(), out_dir / f"{name}.router.log", extra) as url:
        control = None
        if elastic:
            command = [sys.executable, "-m", "planner", "control", "--router", url, "--cluster", str(cluster),
                       "--plan", str(plan), *CONTROL_ARGS]
            control = subprocess.Popen(exec_in(state["hosts"][0]["namespace"], command), stdout=subprocess.PIPE,
                                       stderr=open(out_dir / f"{name}.control.log", "wb"), text=True)
        launched_s = time.monotonic()  # the controller's decisions carry monotonic times (one clock per machine)
        try:
            run_in_head(state, [sys.executable, "-m", "loadtest", "run", "--endpoint", url, "--label", name,
                                "--tokenizer", str(build_tiny_model()), "--no-progress", "--out", str(prefix),
                                "--trace", str(trace), "--max-requests", str(num_requests), "--duration", "100000",
                                "--max-input-tokens", str(MAX_INPUT), "--max-output-tokens", str(MAX_OUTPUT),
                                "--slo-ttft-ms", str(SLO_TTFT_MS), "--slo-tpot-ms", str(SLO_TPOT_MS), "--no-plots"],
                        log=out_dir / f"{name}.loadtest.log", timeout_s=3600)
        finally:
            if control is not None:
                control.terminate()
                out, _ = control.communicate(timeout=30)
                decisions = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
                for decision in decisions:  # since the load test started (its own start-up, ~2 s, included)
                    decision["since_start_s"] = round(decision["at_s"] - launched_s, 1)
    return {"result": json.loads(Path(f"{prefix}.json").read_text()), "decisions": decisions}


def simulate_arms(cluster_path: Path, plan_path: Path, rows: list[dict], phases: list[Phase]) -> dict:
    """The same requests through the simulator: the static plan, and the controller on the simulated clock."""
    from loadtest.workload import PlannedRequest
    from planner.core.replan import ControlPolicy
    from planner.sim.costs import AnalyticCosts
    from planner.sim.elastic import simulate_elastic
    from planner.spec.cluster import load_cluster
    from planner.spec.model import model_from_fields

    cluster, plan = load_cluster(cluster_path), load_plan(plan_path)
    requests = [PlannedRequest(i, r["timestamp"] / 1000, r["input_length"], r["output_length"])
                for i, r in enumerate(rows)]
    costs = AnalyticCosts(model_from_fields(plan.model, "plan.model"))
    policy = ControlPolicy(interval_s=5, min_interval_s=20, min_requests=15)
    out = {}
    for name, run in (("static", simulate_elastic(cluster, plan, requests, costs)),
                      ("elastic", simulate_elastic(cluster, plan, requests, costs, policy=policy))):
        as_result = {"start_times": [r.arrival_s for r in run.records], "ttfts": [r.ttft_s or 0.0 for r in run.records],
                     "latencies": [r.latency_s or 0.0 for r in run.records],
                     "output_lens": [r.output_tokens for r in run.records],
                     "errors": ["" if r.success else (r.error or "failed") for r in run.records]}
        out[name] = {"phases": per_phase(as_result, phases), "actions": [d.to_json() for d in run.actions]}
    return out


def latency_timeline(result: dict, bin_s: float = 10.0) -> dict[str, list]:
    """p90 TTFT and TPOT (ms) of the requests sent in each `bin_s` bin, for the plot."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for since_s, ttft, tpot in _requests(result):
        if ttft is not None:
            bins.setdefault(int(since_s // bin_s), []).append((ttft, tpot))
    keys = range(max(bins, default=-1) + 1)
    return {"t_s": [k * bin_s for k in keys],
            "p90_ttft_ms": [_p90_ms([a for a, _ in bins.get(k, [])]) for k in keys],
            "p90_tpot_ms": [_p90_ms([b for _, b in bins.get(k, [])]) for k in keys]}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, arm in report["arms"].items():
        line = arm["timeline"]
        for ax, key in zip(axes, ("p90_ttft_ms", "p90_tpot_ms")):
            ax.plot(line["t_s"], [v if v is not None else float("nan") for v in line[key]], label=name)
    for decision in report["arms"].get("elastic", {}).get("decisions", []):
        if decision["action"] == "apply" and decision.get("since_start_s") is not None:
            for ax in axes:
                ax.axvline(decision["since_start_s"], color="grey", lw=0.7, ls=":")
    axes[0].axhline(SLO_TTFT_MS, color="red", lw=0.5)
    axes[1].axhline(SLO_TPOT_MS, color="red", lw=0.5)
    axes[0].set_ylabel("p90 TTFT (ms)")
    axes[1].set_ylabel("p90 TPOT (ms)")
    axes[1].set_xlabel("time since the first request (s), 10 s bins; dotted: the controller's actions")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    phases = report["phases"]
    lines = ["Lab " + report["lab"]["name"] + ": " + ", ".join(
        f"{n}x {t}" for t, n in report["devices"].items()) + ". Phases: " + ", ".join(
        f"{p['name']} ({p['trace']}) {p['rate_rps']:g} req/s for {p['seconds']:g} s" for p in phases) +
        f". SLO TTFT {SLO_TTFT_MS:.0f} ms, TPOT {SLO_TPOT_MS:.0f} ms. Goodput in requests meeting both per "
        "second (attainment).", "",
        "| arm | " + " | ".join(p["name"] for p in phases) + " | all | failed | vs measured static |",
        "|---|" + "---:|" * (len(phases) + 3)]
    base_arm = report["arms"].get("static") or next(iter(report["arms"].values()))
    base = base_arm["phases"][-1]["goodput_rps"]
    rows = [(f"measured: {name}", arm["phases"]) for name, arm in report["arms"].items()]
    rows += [(f"simulated: {name}", arm["phases"]) for name, arm in report["simulated"].items()]
    for label, per in rows:
        cells = " | ".join(f"{r['goodput_rps']:.2f} ({100 * (r['slo_attainment'] or 0):.0f} %)" for r in per)
        ratio = per[-1]["goodput_rps"] / base if base else float("nan")
        lines.append(f"| {label} | {cells} | {per[-1]['failed']} | {ratio:.2f}x |")
    actions = [d for d in report["arms"].get("elastic", {}).get("decisions", []) if d["action"] == "apply"]
    lines += ["", "Measured actions: " + ("; ".join(
        f"{d['since_start_s']:g} s: {', '.join(f'{g} {a} -> {b}' for g, a, b in d['flips']) or 'weights'} "
        f"({d['reason']})" for d in actions) or "none") + "."]
    return "\n".join(lines)


ARMS = ("static", "elastic", "hindsight")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, each refused in one line when it cannot be honoured (before the lab comes up)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab", default=str(REPO / "configs" / "lab" / "elastic4.json"))
    ap.add_argument("--profiles", default=None, help="folder with <TYPE>.json profiles (default: measure them)")
    ap.add_argument("--conv-rps", type=float, default=2.5)
    ap.add_argument("--code-rps", type=float, default=5.0)
    ap.add_argument("--code-first", action="store_true", help="the code phase first (default: conversation first)")
    ap.add_argument("--phase-s", type=float, default=120.0)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"a comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--name", default="lab_elastic")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        ap.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    for flag, value in (("--conv-rps", args.conv_rps), ("--code-rps", args.code_rps), ("--phase-s", args.phase_s)):
        if not value > 0:
            ap.error(f"{flag} {value:g}: must be > 0")
    if args.profiles:
        missing = [t for t in load_lab(args.lab).device_types if not (Path(args.profiles) / f"{t}.json").exists()]
        if missing:
            ap.error(f"--profiles {args.profiles}: no profile for {', '.join(missing)} (<TYPE>.json, from `lab profile`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    lab = load_lab(args.lab)
    phases = [Phase("conversation", "azure-conv", args.conv_rps, args.phase_s),
              Phase("code", "azure-code", args.code_rps, args.phase_s)]
    if args.code_first:
        phases.reverse()
    work = Path(f"/tmp/hexserve-{args.name}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        state = up(lab)
    except LabError as exc:  # not root, or the lab's name or subnet taken: one line, nothing left behind
        print(f"benchmarks.lab_elastic: {exc}", file=sys.stderr)
        return 2
    arms: dict[str, dict] = {}
    try:
        profiles = ({t: Path(args.profiles) / f"{t}.json" for t in lab.device_types} if args.profiles
                    else profile_device_types(lab, state, work / "profiles"))
        lab = dataclasses.replace(lab, profiles=profiles)
        first, hindsight = plan_for(lab, phases[0], work), plan_for(lab, phases[1], work)
        rows = write_trace(phases, work / "shift.jsonl")
        for arm in args.arms.split(","):
            cluster, plan = hindsight if arm == "hindsight" else first
            print(f"arm {arm}", flush=True)
            measured = run_arm(state, arm, plan, cluster, work / "shift.jsonl", len(rows), work, arm == "elastic")
            arms[arm] = {"plan": json.loads(plan.read_text()), "decisions": measured["decisions"],
                         "phases": per_phase(measured["result"], phases),
                         "timeline": latency_timeline(measured["result"])}
            print(json.dumps(arms[arm]["phases"]), flush=True)
    finally:
        down(lab.name)
    report = {"lab": json.loads(Path(args.lab).read_text()), "devices": _device_counts(lab),
              "phases": [dataclasses.asdict(p) for p in phases], "control_args": list(CONTROL_ARGS),
              "arms": arms, "simulated": simulate_arms(*first, rows, phases), "wall_s": round(time.time() - started)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report) + "\n")
    plot(report, RESULTS / f"{args.name}.png")
    print(markdown(report))
    return 0


def _device_counts(lab) -> dict[str, int]:
    counts: dict[str, int] = {}
    for host in lab.hosts:
        counts[host.gpu_type] = counts.get(host.gpu_type, 0) + host.num_devices
    return counts


if __name__ == "__main__":
    sys.exit(main())
