"""Right-sizing, checked in simulation: how few GPUs serve each fleet's traffic at the SLOs.

    .venv/bin/python -m benchmarks.right_size          # ~1 min on 2 CPU cores

For the fleet benchmark's fleets (Llama-2-70B, Azure conversation trace at its
own rate, 5.5 req/s) and the cross-region example (Qwen2.5-32B, Azure code
trace, 2.6 req/s): the whole fleet planned for throughput; the cheapest
sub-fleet serving the rate + 20 % headroom by the model alone
(`planner.core.right_size`); and the same checked in simulation on the
trace, the margin raised until it holds (`planner solve --objective cost`,
`planner.sim.right_size_check`). Each plan is simulated on its trace at the trace's own rate
(first 2000 requests) with the router's policy: SLO attainment says whether
the right-sized plan still serves. Writes benchmarks/results/right_size.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.sim_fleet import FLEETS, MODEL, cluster_doc
from common.traces import load_trace
from loadtest.metrics import SLO
from loadtest.workload import WorkloadConfig
from planner.core.right_size import right_size
from planner.core.solver import solve
from planner.sim.costs import AnalyticCosts
from planner.sim.from_plan import fleet_from_plan
from planner.sim.right_size_check import checked_right_size
from planner.sim.sweep import run_at
from planner.spec.cluster import load_cluster, parse_cluster
from planner.spec.model import model_from_fields

RESULTS = Path(__file__).resolve().parent / "results"


def cases() -> list[tuple[str, object, str, int | None]]:
    """(name, cluster, trace name, prompt clip) per fleet: Llama-2-70B's 4096-token window clips prompts."""
    out = [(f"{name} ({MODEL})", parse_cluster(cluster_doc(name, nodes)), "azure-conv", 4096 - 512)
           for name, nodes in FLEETS.items()]
    out.append(("cross-region-32 (Qwen2.5-32B)", load_cluster("configs/cross_region_32.json"), "azure-code", None))
    return out


def simulated(plan, cluster, trace_name: str, max_input: int | None, max_requests: int) -> dict:
    """SLO attainment and p90 latencies of `plan` on the trace at its own rate."""
    slo = SLO(cluster.workload.ttft_slo_s * 1e3, cluster.workload.tpot_slo_s * 1e3)
    wcfg = WorkloadConfig(arrival="trace", max_requests=max_requests, duration_s=1e9,
                          max_input_tokens=max_input, max_output_tokens=512)
    point = run_at(fleet_from_plan(plan, cluster), load_trace(trace_name),
                   AnalyticCosts(model_from_fields(plan.model, "plan.model")), slo, wcfg, 1.0)
    r = point.result
    return {"rate_rps": round(point.rate_rps, 3), "slo_attainment": round(r["slo_attainment"], 4),
            "p90_ttft_ms": round(r["p90_ttft_ms"] or 0, 1), "p90_tpot_ms": round(r["p90_tpot_ms"] or 0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--out", default=str(RESULTS / "right_size"))
    args = ap.parse_args(argv)
    if args.max_requests < 2:
        ap.error(f"--max-requests {args.max_requests}: give at least 2 (a rate needs two arrivals)")
    rows = []
    for name, cluster, trace, max_input in cases():
        for objective in ("throughput", "cost (model)", "cost (checked in simulation)"):
            started = time.monotonic()
            plan = (solve(cluster) if objective == "throughput" else right_size(cluster) if objective == "cost (model)"
                    else checked_right_size(cluster))
            solve_s = time.monotonic() - started
            gpus = sum(len(g.gpus) for g in plan.groups)
            rows.append({"fleet": name, "objective": objective, "gpus": gpus,
                         "cost_per_hour": round(plan.predicted.cost_per_hour, 2),
                         "capacity_rps": round(plan.throughput_rps, 2), "solve_s": round(solve_s, 2),
                         "right_sizing": plan.solver.get("right_sizing"),
                         **simulated(plan, cluster, trace, max_input, args.max_requests)})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| fleet | objective | GPUs used | $/h | planned capacity (req/s) | trace rate (req/s) | "
             "simulated SLO attainment | p90 TTFT / TPOT (ms) | solve (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['fleet']} | {r['objective']} | {r['gpus']} | {r['cost_per_hour']:.2f} | "
                     f"{r['capacity_rps']:.2f} | {r['rate_rps']:.2f} | {100 * r['slo_attainment']:.1f} % | "
                     f"{r['p90_ttft_ms']:.0f} / {r['p90_tpot_ms']:.0f} | {r['solve_s']:.1f} |")
    md = "\n".join(lines)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
