"""Elastic vs static at fleet scale, simulated: a workload that shifts, and a lost worker.

    .venv/bin/python -m benchmarks.elastic_sim            # ~2 min on 2 CPU cores

Llama-3-8B on a HexGen-style mixed fleet (4x H100, 4x A100-80G, 8x L40, 8x
A6000; 25 GB/s between nodes). The requests shift, each phase with its own
trace's lengths in trace order and Poisson arrivals:

    code         Azure code trace lengths (long prompts, ~28 output tokens)
    conversation Azure conversation trace lengths
    burst        conversation at twice the rate

Arms, all on the same requests, simulator, router policy ("plan":
load-corrected weights) and failures:
- static, plan for code: `planner solve` for the code trace, the workload known
  when the cluster starts, kept all along;
- static, plan for conversation: the plan one would make in hindsight for the
  later phases;
- elastic: starts from the plan for code and runs `planner.core.replan.Controller`
  (default policy) on the simulated clock (planner.sim.elastic; the same code
  as `python -m planner control`): role flips and route weights.

Goodput: requests meeting both SLOs per second. The "lost worker" scenario
loses the worker of the code plan's largest prefill group in the middle of
the conversation phase. The "GPUs join" scenario starts without the fleet's
last node (the plans are made without it) and lists it from the start of the
burst: the static plans keep serving without it; the elastic controller may
start new groups on it, which take work 60 s later (model load). Writes benchmarks/results/elastic_sim.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from benchmarks.sim_fleet import cluster_doc
from common.traces import SHARED_TRACES_DIR, load_trace
from loadtest.metrics import SLO, summarize
from loadtest.workload import PlannedRequest
from planner.core.replan import ControlPolicy
from planner.core.solver import solve
from planner.sim.costs import AnalyticCosts
from planner.sim.elastic import simulate_elastic
from planner.spec.cluster import parse_cluster
from planner.spec.model import model_preset, preset_names

RESULTS = Path(__file__).resolve().parent / "results"
FLEETS = {"hetero-24": [("H100", 4), ("A100-80G", 4), ("L40", 8), ("A6000", 8)],
          "hetero-32": [("H100", 8), ("A100-80G", 8), ("L40", 8), ("A6000", 8)]}
PLAN_TRACES = {"code": "azure_llm_2023_code.csv", "conversation": "azure_llm_2023_conv.csv"}
SLO_TTFT_MS, SLO_TPOT_MS = 2000.0, 100.0
MAX_INPUT, MAX_OUTPUT = 4096 - 512, 512  # Llama-2-70B's 4096-token window


def shifting_requests(phases: list[tuple[str, str, float, float]], seed: int = 0) -> list[PlannedRequest]:
    """(name, trace, rate req/s, seconds) per phase: the trace's lengths in order, Poisson arrivals."""
    rng = random.Random(seed)
    out: list[PlannedRequest] = []
    start = 0.0
    cursor: dict[str, int] = {}
    for _, trace_name, rate, seconds in phases:
        trace = load_trace(trace_name)
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            k = cursor.get(trace_name, 0)
            r = trace[k % len(trace)]
            cursor[trace_name] = k + 1
            out.append(PlannedRequest(len(out), t, max(1, min(r.input_tokens, MAX_INPUT)),
                                      max(1, min(r.output_tokens, MAX_OUTPUT))))
        start += seconds
    return out


def phase_rows(records, phases, slo: SLO) -> list[dict]:
    rows, start = [], 0.0
    for name, _, rate, seconds in phases + [("all", "", 0.0, sum(p[3] for p in phases))]:
        lo, hi = (0.0, seconds) if name == "all" else (start, start + seconds)
        part = [r for r in records if lo <= r.arrival_s < hi]
        s = summarize(part, slo, duration_s=seconds)
        rows.append({"phase": name, "requests": len(part), "offered_rps": round(len(part) / seconds, 3),
                     "goodput_rps": round(sum(slo.met(r) for r in part) / seconds, 3),
                     "slo_attainment": round(s["slo_attainment"], 4), "failed": sum(not r.success for r in part),
                     "p90_ttft_ms": s.get("p90_ttft_ms"), "p90_tpot_ms": s.get("p90_tpot_ms")})
        if name != "all":
            start += seconds
    return rows


def fleet_cluster(fleet: str, model: str, trace_file: str):
    doc = cluster_doc(fleet, FLEETS[fleet])
    doc["model"] = {"preset": model}
    doc["workload"]["trace"]["path"] = str(SHARED_TRACES_DIR / trace_file)
    # The phases replay the traces' lengths with Poisson arrivals (shifting_requests): plan for those,
    # not for the traces' own bursts (the code trace's gaps have a CV^2 of 173).
    doc["workload"]["burstiness"] = 1.0
    return parse_cluster(doc)


def group_holding(plan, gpu: str) -> str:
    return next(g.id for g in plan.groups if gpu in g.gpus)


def run_scenario(clusters: dict, plans: dict, requests, costs, policy, lost_gpus, phases, slo: SLO,
                 joins: dict | None = None) -> dict:
    """Static under each plan, and elastic from the first-phase plan, on the same requests; each plan
    loses the group that holds each lost GPU at its time; `joins`: per plan, (time, the fleet from then on)."""
    first = next(iter(plans))
    joins = joins or {}
    failures = {name: [(t, group_holding(plan, gpu)) for t, gpu in lost_gpus] for name, plan in plans.items()}
    arms = {f"static (plan for {name})": simulate_elastic(clusters[name], plan, requests, costs,
                                                          failures=failures[name], joins=joins.get(name, []))
            for name, plan in plans.items()}
    elastic = simulate_elastic(clusters[first], plans[first], requests, costs, policy=policy,
                               failures=failures[first], joins=joins.get(first, []))
    arms[f"elastic (from the plan for {first})"] = elastic
    return {"lost_gpus": lost_gpus, "failures": failures,
            "arms": {label: phase_rows(run.records, phases, slo) for label, run in arms.items()},
            "timeline": {label: goodput_timeline(run.records, slo) for label, run in arms.items()},
            "actions": [d.to_json() for d in elastic.actions],
            "decisions_none": sum(d.action == "none" for d in elastic.decisions)}


def goodput_timeline(records, slo: SLO, bin_s: float = 10.0) -> list[float]:
    """Requests meeting the SLOs per second, by arrival, in `bin_s` bins over every arrival."""
    bins: dict[int, int] = {}
    for r in records:
        if slo.met(r):
            bins[int(r.arrival_s // bin_s)] = bins.get(int(r.arrival_s // bin_s), 0) + 1
    last = max((int(r.arrival_s // bin_s) for r in records), default=-1)
    return [bins.get(k, 0) / bin_s for k in range(last + 1)]


def markdown(report: dict) -> str:
    lines = [f"{report['model']} on {report['fleet_name']} ({', '.join(f'{n}x {t}' for t, n in report['fleet'])}), "
             f"SLO TTFT {SLO_TTFT_MS:.0f} ms / TPOT {SLO_TPOT_MS:.0f} ms. Phases: " +
             ", ".join(f"{p['name']} {p['rate_rps']:g} req/s for {p['seconds']:g} s" for p in report["phases"]) +
             ". Simulated (analytical cost model); goodput = requests meeting both SLOs per second.", ""]
    for name, sc in report["scenarios"].items():
        labels = list(sc["arms"])
        best_static = max((sc["arms"][a][-1]["goodput_rps"] for a in labels if a.startswith("static")))
        first_static = sc["arms"][labels[0]][-1]["goodput_rps"]
        lost = ", ".join(f"the group holding {gpu} at {t:g} s" for t, gpu in sc["lost_gpus"])
        lines += [f"**{name}**" + (f" (lost: {lost})" if lost else ""), "",
                  "| arm | " + " | ".join(r["phase"] for r in sc["arms"][labels[0]]) + " | failed | vs static |",
                  "|---|" + "---:|" * (len(sc["arms"][labels[0]]) + 2)]
        for label in labels:
            rows = sc["arms"][label]
            ratio = rows[-1]["goodput_rps"] / first_static if first_static else float("inf")
            lines.append(f"| {label} | " + " | ".join(f"{r['goodput_rps']:.1f} ({100 * r['slo_attainment']:.0f} %)"
                                                       for r in rows) + f" | {rows[-1]['failed']} | {ratio:.2f}x |")
        elastic = sc["arms"][labels[-1]][-1]["goodput_rps"]
        lines += ["", f"Elastic / best static plan: {elastic / best_static:.2f}x. Actions: " +
                  ("; ".join(f"{a['at_s']:g} s: " + (", ".join([f"{g} {a_} -> {b}" for g, a_, b in a["flips"]] +
                                                               [f"new {r} group {g} ({n} GPUs)"
                                                                for g, r, n in a.get("new_groups", [])])
                                                     or "weights re-solved") +
                             (f" (left out {a['left_out']})" if a["left_out"] else "") for a in sc["actions"])
                   or "none") + ".", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = report["scenarios"]
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(9, 3.2 * len(scenarios)), squeeze=False)
    for ax, (name, sc) in zip(axes[:, 0], scenarios.items()):
        for label, series in sc["timeline"].items():
            ax.plot([10 * k for k in range(len(series))], series, label=label)
        for a in sc["actions"]:
            ax.axvline(a["at_s"], color="grey", lw=0.6, ls=":")
        ax.set_title(name)
        ax.set_ylabel("goodput (req/s)")
    axes[-1, 0].set_xlabel("arrival time (s)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-s", type=float, default=300.0, help="seconds per phase")
    ap.add_argument("--code-rps", type=float, default=60.0)
    ap.add_argument("--conv-rps", type=float, default=40.0, help="the burst runs at twice this")
    ap.add_argument("--model", default="Llama-3-8B")
    ap.add_argument("--fleet", default="hetero-24", choices=sorted(FLEETS))
    ap.add_argument("--out", default=str(RESULTS / "elastic_sim"))
    args = ap.parse_args(argv)
    for flag, value in (("--phase-s", args.phase_s), ("--code-rps", args.code_rps), ("--conv-rps", args.conv_rps)):
        if not value > 0:
            ap.error(f"{flag} {value:g}: must be > 0")
    if args.model not in preset_names():
        ap.error(f"--model {args.model!r}: not a preset; choose from {', '.join(preset_names())}")
    # The elastic run starts from the plan for the workload known when the cluster starts (the first
    # phase); the static plan for the conversation trace is the plan one would make in hindsight.
    clusters = {name: fleet_cluster(args.fleet, args.model, trace) for name, trace in PLAN_TRACES.items()}
    plans = {name: solve(c, mode="disaggregated", time_limit_s=10) for name, c in clusters.items()}
    phases = [("code", "azure-code", args.code_rps, args.phase_s),
              ("conversation", "azure-conv", args.conv_rps, args.phase_s),
              ("burst", "azure-conv", 2 * args.conv_rps, args.phase_s)]
    requests = shifting_requests(phases)
    slo, costs, policy = SLO(SLO_TTFT_MS, SLO_TPOT_MS), AnalyticCosts(model_preset(args.model)), ControlPolicy()
    code_plan = plans["code"]
    lost_gpu = max((g for g in code_plan.groups if g.role == "prefill"), key=lambda g: g.capacity_rps).gpus[0]
    report = {"fleet_name": args.fleet, "fleet": FLEETS[args.fleet], "model": args.model,
              "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS},
              "phases": [{"name": n, "trace": t, "rate_rps": r, "seconds": s} for n, t, r, s in phases],
              "policy": {k: getattr(policy, k) for k in policy.__slots__},
              "plans": {name: [{"id": g.id, "role": g.role, "gpu_types": g.gpu_types, "tp": g.tp, "pp": g.pp}
                               for g in plan.groups] for name, plan in plans.items()},
              "scenarios": {}}
    for name, lost_gpus in {"shift": [], "shift + lost worker": [(1.5 * args.phase_s, lost_gpu)]}.items():
        report["scenarios"][name] = run_scenario(clusters, plans, requests, costs, policy, lost_gpus, phases, slo)
    # The fleet without its last node until the burst: plans made without it, then it joins.
    last = len(FLEETS[args.fleet]) - 1
    smaller = {name: c.subset({n.index: n.num_gpus for n in c.nodes if n.index != last}) for name, c in clusters.items()}
    small_plans = {name: solve(c, mode="disaggregated", time_limit_s=10) for name, c in smaller.items()}
    joins = {name: [(2 * args.phase_s, clusters[name])] for name in clusters}
    joined = f"shift + {FLEETS[args.fleet][last][1]}x {FLEETS[args.fleet][last][0]} join at the burst"
    report["scenarios"][joined] = run_scenario(smaller, small_plans, requests, costs, policy, [], phases, slo, joins)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md + "\n")
    plot(report, out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
