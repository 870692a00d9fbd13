"""Elastic vs static at fleet scale, simulated: a workload that shifts, and a lost worker.

    .venv/bin/python -m benchmarks.elastic_sim            # ~1-3 min on 2 CPU cores

Llama-2-70B on a HexGen-style mixed fleet (8x H100, 8x A100-80G, 8x L40, 8x
A6000; 25 GB/s between nodes), planned by `planner solve` for the Azure
conversation trace. The requests then shift, each phase with its own trace's
lengths in trace order and Poisson arrivals:

    code         Azure code trace lengths (long prompts, ~28 output tokens)
    conversation Azure conversation trace lengths
    burst        conversation at twice the rate

Both runs serve the same requests with the same simulator, router policy
("plan": load-corrected weights) and failures; the static run keeps the plan,
the elastic run runs `planner.core.replan.Controller` on the simulated clock
(planner.sim.elastic; the same code as `python -m planner control`). Goodput:
requests meeting TTFT and TPOT SLOs per second of the run. The "lost worker"
scenario loses the worker of one decode group at the middle of the
conversation phase.
Writes benchmarks/results/elastic_sim.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from benchmarks.sim_fleet import MODEL, cluster_doc
from common.traces import SHARED_TRACES_DIR, load_trace
from loadtest.metrics import SLO, summarize
from loadtest.workload import PlannedRequest
from planner.core.replan import ControlPolicy
from planner.core.solver import solve
from planner.sim.costs import AnalyticCosts
from planner.sim.elastic import simulate_elastic
from planner.spec.cluster import parse_cluster
from planner.spec.model import model_preset

RESULTS = Path(__file__).resolve().parent / "results"
FLEETS = {"hetero-32": [("H100", 8), ("A100-80G", 8), ("L40", 8), ("A6000", 8)],
          "hetero-24": [("H100", 4), ("A100-80G", 4), ("L40", 8), ("A6000", 8)]}
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-s", type=float, default=300.0, help="seconds per phase")
    ap.add_argument("--code-rps", type=float, default=6.0)
    ap.add_argument("--conv-rps", type=float, default=8.0)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--plan-for", default="code", choices=sorted(PLAN_TRACES),
                    help="the trace the static plan (and the elastic run's first plan) is solved for")
    ap.add_argument("--fleet", default="hetero-32", choices=sorted(FLEETS))
    ap.add_argument("--out", default=str(RESULTS / "elastic_sim"))
    args = ap.parse_args(argv)
    doc = cluster_doc("hetero", FLEETS[args.fleet])
    doc["model"] = {"preset": args.model}
    # The plan is made for the workload known when the cluster starts: the first phase's trace.
    doc["workload"]["trace"]["path"] = str(SHARED_TRACES_DIR / PLAN_TRACES[args.plan_for])
    cluster = parse_cluster(doc)
    plan = solve(cluster, mode="disaggregated", time_limit_s=10)
    phases = [("code", "azure-code", args.code_rps, args.phase_s),
              ("conversation", "azure-conv", args.conv_rps, args.phase_s),
              ("burst", "azure-conv", 2 * args.conv_rps, args.phase_s)]
    requests = shifting_requests(phases)
    slo = SLO(SLO_TTFT_MS, SLO_TPOT_MS)
    costs = AnalyticCosts(model_preset(args.model))
    policy = ControlPolicy()
    decode_groups = [g.id for g in plan.groups if g.role == "decode"]
    scenarios = {"shift": [], "shift + lost worker": [(1.5 * args.phase_s, decode_groups[-1])]}
    report = {"fleet": FLEETS[args.fleet], "model": args.model, "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS},
              "phases": [{"name": n, "trace": t, "rate_rps": r, "seconds": s} for n, t, r, s in phases],
              "policy": {k: getattr(policy, k) for k in policy.__slots__},
              "plan_groups": [{"id": g.id, "role": g.role, "gpu_types": g.gpu_types, "tp": g.tp, "pp": g.pp}
                              for g in plan.groups], "scenarios": {}}
    for name, failures in scenarios.items():
        static = simulate_elastic(cluster, plan, requests, costs, policy=None, failures=failures)
        elastic = simulate_elastic(cluster, plan, requests, costs, policy=policy, failures=failures)
        report["scenarios"][name] = {
            "failures": failures,
            "static": phase_rows(static.records, phases, slo),
            "elastic": phase_rows(elastic.records, phases, slo),
            "actions": [d.to_json() for d in elastic.actions],
            "decisions": [d.to_json() for d in elastic.decisions],
        }
        print(name, json.dumps(report["scenarios"][name], indent=1))
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
