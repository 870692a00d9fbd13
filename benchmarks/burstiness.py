"""Plans that hold on bursty traces: the planner's queue with the trace's burstiness, against Poisson.

The planner sizes prefill (and colocated) groups with Kingman's G/G/1 wait,
V = (ca2 + cs2) / 2 (planner.core.queueing), ca2 read off the trace's arrival
gaps. The baseline is the same planner told the arrivals are Poisson
(``workload.burstiness: 1``, ca2 = 1: the M/D/1-like queue DistServe and our
planner before assumed). Both plan Llama-2-70B on the fleet benchmark's
fleets (benchmarks.sim_fleet) for each Azure 2023 trace; each plan is then
simulated on the trace's first requests:

- at the trace's own rate: SLO attainment (TTFT <= 2 s and TPOT <= 100 ms);
- replayed faster until fewer than 90 % meet both: the rate it serves at SLO,
  against the rate the planner predicted (its capacity): > 1 means the plan
  promises more than it serves.

And right-sizing (``solve --objective cost`` without the simulation check) on
configs/cross_region_32.json (Qwen2.5-32B, Azure code trace): the cost of
the sub-fleet the model alone picks and its attainment in simulation.

    .venv/bin/python -m benchmarks.burstiness            # ~5 min
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.results_files import write_results
from benchmarks.sim_fleet import (FLEETS, MAX_INPUT_TOKENS, MAX_OUTPUT_TOKENS, MODEL, SLO_TPOT_MS, SLO_TTFT_MS,
                                  cluster_doc, replayed_trace)
from common.traces import SHARED_TRACES_DIR, load_trace
from loadtest.metrics import SLO
from loadtest.workload import WorkloadConfig
from planner.core.right_size import right_size
from planner.core.solver import solve
from planner.sim.costs import AnalyticCosts
from planner.sim.from_plan import fleet_from_plan
from planner.sim.right_size_check import simulated_attainment
from planner.sim.sweep import max_rate_at_slo, run_at
from planner.spec.cluster import Cluster, parse_cluster
from planner.spec.model import model_preset

TRACES = {"azure-conv": "azure_llm_2023_conv.csv", "azure-code": "azure_llm_2023_code.csv"}
VARIANTS = {"trace's burstiness (ours)": None, "Poisson assumed": 1.0}  # workload.burstiness


def _doc(fleet: str, trace: dict, burstiness: float | None) -> dict:
    doc = cluster_doc(fleet, FLEETS[fleet], trace)
    if burstiness is not None:
        doc["workload"]["burstiness"] = burstiness
    return doc


def planned_clusters(traces: dict[str, list], fleets: list[str]) -> dict[tuple[str, str, str], Cluster]:
    """Per (trace, fleet, variant), the cluster planned for the requests replayed, clipped as the replay clips
    them (as benchmarks.sim_fleet): written as a trace the cluster reads when it is parsed."""
    clusters = {}
    with tempfile.TemporaryDirectory() as workdir:
        for trace_name, trace in traces.items():
            replayed = replayed_trace(trace, Path(workdir) / f"{trace_name}.jsonl")
            for fleet_name in fleets:
                for variant, burstiness in VARIANTS.items():
                    clusters[(trace_name, fleet_name, variant)] = parse_cluster(
                        _doc(fleet_name, replayed, burstiness), base_dir=".")
    return clusters


def fleet_rows(max_requests: int, time_limit_s: float, fleets: list[str]) -> list[dict]:
    costs = AnalyticCosts(model_preset(MODEL))
    slo = SLO(SLO_TTFT_MS, SLO_TPOT_MS)
    wcfg = WorkloadConfig(arrival="trace", max_requests=max_requests, duration_s=1e9,
                          max_input_tokens=MAX_INPUT_TOKENS, max_output_tokens=MAX_OUTPUT_TOKENS)
    traces = {name: load_trace(name)[:max_requests] for name in TRACES}
    rows = []
    for (trace_name, fleet_name, variant), cluster in planned_clusters(traces, fleets).items():
        started = time.time()
        trace = traces[trace_name]
        plan = solve(cluster, mode="auto", time_limit_s=time_limit_s)
        fleet = fleet_from_plan(plan, cluster)
        native = run_at(fleet, trace, costs, slo, wcfg, 1.0)
        best = max_rate_at_slo(fleet, trace, costs, slo, wcfg, target=0.9, iterations=10)
        rate = best.rate_rps if best else 0.0
        rows.append({
            "trace": trace_name, "fleet": fleet_name, "variant": variant,
            "arrival_cv2": round(cluster.workload.arrival_cv2, 3), "mode": plan.mode,
            "groups": sorted(f"{g.role.value} {'+'.join(f'{n}x{t}' for t, n in g.gpu_types.items())} "
                             f"TP{g.tp} PP{g.pp}" for g in plan.groups),
            "predicted_rps": plan.predicted.throughput_rps, "rate_at_slo_rps": rate,
            "native_rps": native.rate_rps, "native_attainment": native.result["slo_attainment"],
            "native_p90_ttft_ms": native.result["p90_ttft_ms"], "seconds": round(time.time() - started, 1),
        })
        print(f"{trace_name} {fleet_name} {variant}: predicted {plan.predicted.throughput_rps:.2f} req/s, "
              f"at SLO {rate:.2f}, attainment at the trace's rate {native.result['slo_attainment']:.1%}", flush=True)
    return rows


def right_size_rows() -> list[dict]:
    rows = []
    doc = json.loads(open("configs/cross_region_32.json").read())
    doc["workload"]["trace"] = str(SHARED_TRACES_DIR / TRACES["azure-code"])
    for variant, burstiness in VARIANTS.items():
        if burstiness is not None:
            doc["workload"]["burstiness"] = burstiness
        cluster = parse_cluster(doc, base_dir=".")
        plan = right_size(cluster)
        info = plan.solver["right_sizing"]
        rows.append({"variant": variant, "serving_gpus": info["serving_gpus"],
                     "cost_per_hour": info["serving_cost_per_hour"], "fleet_cost_per_hour": info["fleet_cost_per_hour"],
                     "attainment": simulated_attainment(plan, cluster)})
        print(f"right-size {variant}: ${info['serving_cost_per_hour']:.2f}/h, attainment {rows[-1]['attainment']:.1%}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--solve-time-limit", type=float, default=8.0)
    ap.add_argument("--fleets", nargs="+", default=["homo-A100", "hetero"], choices=list(FLEETS))
    args = ap.parse_args(argv)
    rows = fleet_rows(args.max_requests, args.solve_time_limit, args.fleets)
    sized = right_size_rows()
    header = ["trace (gaps' CV²)", "fleet", "planner's queue", "plan", "predicted req/s", "served at SLO req/s",
              "predicted / served", "attainment at the trace's rate", "p90 TTFT there (ms)"]
    table = [[f"{r['trace']} ({r['arrival_cv2']:.3g})" if r["variant"] in VARIANTS and r["arrival_cv2"] != 1 else r["trace"],
              r["fleet"], r["variant"], f"{r['mode']}: " + ", ".join(r["groups"]), f"{r['predicted_rps']:.2f}",
              f"{r['rate_at_slo_rps']:.2f}",
              f"{r['predicted_rps'] / r['rate_at_slo_rps']:.2f}" if r["rate_at_slo_rps"] else "inf",
              f"{r['native_attainment']:.1%}", f"{r['native_p90_ttft_ms']:.0f}"] for r in rows]
    table += [["azure-code, Qwen2.5-32B", "cross_region_32, right-sized", r["variant"],
               ", ".join(f"{n}x{t}" for t, n in r["serving_gpus"].items()) + f" (${r['cost_per_hour']:.2f}/h of "
               f"${r['fleet_cost_per_hour']:.2f}/h)", "", "", "", f"{r['attainment']:.1%}", ""] for r in sized]
    write_results("burstiness", {"model": MODEL, "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS},
                                 "max_requests": args.max_requests, "rows": rows, "right_size": sized}, header, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
