"""Planner benchmark: solve time and plan throughput against the exact optimum and baselines.

    .venv/bin/python -m benchmarks.planner_solve                 # all sizes and mixes (~15 min on 2 cores)
    .venv/bin/python -m benchmarks.planner_solve --sizes 8,16,64 # a subset

Fleets of 8, 16, 64, 320 and 1024 GPUs in three mixes, serving Llama-2-70B
(prompts 1024 tokens, outputs 256, TTFT 2 s, TPOT 100 ms):
- two-type: H100 and L40S, half each;
- four-type: H100, A100-80G, L40S and A6000, a quarter each;
- cross-region: H100 in one region, A100-80G in another, joined by a 0.5 GB/s
  link (100x slower than the 50 GB/s fabric inside a region).

For each fleet, in one process on the same cost model:
- ours: ``planner.core.solver.solve`` (heuristic, ``--time-limit`` seconds at most);
- exact: the OR-Tools optimum (fleets of at most 16 GPUs), and our ratio to it;
- baselines (``benchmarks.planner_baselines``): best homogeneous subset at the same
  $/hour, DistServe-style uniform groups, random partition + max-flow, and the
  per-type prefill/decode split enumeration.
Predicted throughput is the max-flow value in requests/s. Writes
benchmarks/results/planner_solve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from benchmarks import planner_baselines as baselines
from planner.core.exact import solve_exact
from planner.core.flow import RouteTable
from planner.core.refine import DISAGGREGATED
from planner.core.solver import solve
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import parse_cluster

RESULTS = Path(__file__).resolve().parent / "results"
MIXES = ("two-type", "four-type", "cross-region")
SIZES = (8, 16, 64, 320, 1024)


def fleet_nodes(size: int, mix: str) -> list[dict]:
    """Nodes of 8 GPUs where the size allows, smaller nodes for the smallest fleets."""
    types = {"two-type": ["H100", "L40S"], "four-type": ["H100", "A100-80G", "L40S", "A6000"],
             "cross-region": ["H100", "A100-80G"]}[mix]
    per_type = size // len(types)
    node = min(8, per_type)
    nodes = []
    for k, t in enumerate(types):
        entry = {"name": t.lower(), "gpu_type": t, "num_gpus": node, "count": per_type // node}
        if mix == "cross-region":
            entry["region"] = ("us-east", "eu-west")[k]
        nodes.append(entry)
    return nodes


def make_fleet(size: int, mix: str):
    data = {
        "name": f"{mix}-{size}",
        "fleet": {"nodes": fleet_nodes(size, mix)},
        "network": {"inter_node": {"bandwidth_gb_per_s": 50, "latency_us": 10}},
        "model": {"preset": "Llama-2-70B"},
        "workload": {"input_tokens_mean": 1024, "output_tokens_mean": 256,
                     "slo": {"ttft_ms": 2000, "tpot_ms": 100}},
    }
    if mix == "cross-region":
        data["network"]["links"] = [{"between": ["us-east", "eu-west"], "bandwidth_gb_per_s": 0.5,
                                     "latency_us": 40000}]
    return parse_cluster(data)


def run_one(size: int, mix: str, time_limit: float, exact_limit: float) -> dict:
    cluster = make_fleet(size, mix)
    started, cpu = time.perf_counter(), time.process_time()
    plan = solve(cluster, mode=DISAGGREGATED, time_limit_s=time_limit)
    solve_s, solve_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    auto = solve(cluster, mode="auto", time_limit_s=time_limit)
    row = {
        "fleet": cluster.name, "gpus": cluster.num_gpus, "mix": mix, "solve_s": round(solve_s, 2),
        "solve_cpu_s": round(solve_cpu_s, 2), "load_avg_1m": round(os.getloadavg()[0], 1),
        "ours_rps": round(plan.throughput_rps, 3), "auto_rps": round(auto.throughput_rps, 3), "auto_mode": auto.mode,
        "groups": len(plan.groups), "cost_per_hour": round(cluster.price_per_hour, 2),
        "tokens_per_dollar": round(plan.predicted.tokens_per_dollar),
        "iterations": plan.solver["iterations"],
    }
    if cluster.num_gpus <= 16:
        exact = solve_exact(cluster, time_limit_s=exact_limit)
        row.update(exact_rps=round(exact.value_rps, 3), exact_optimal=exact.optimal,
                   exact_s=round(exact.solve_time_s, 2),
                   vs_exact=round(plan.throughput_rps / exact.value_rps, 4) if exact.value_rps else None)
    ev, routes = GroupEvaluator(cluster), RouteTable(cluster)
    results = [
        baselines.homogeneous_best(cluster, cluster.price_per_hour, time_limit_s=min(time_limit or 10, 10)),
        baselines.distserve_uniform(cluster, ev, routes),
        baselines.random_partition(cluster, 5, ev, routes),
        baselines.per_type_split(cluster, ev, routes),
    ]
    row["baselines"] = {b.name: {"rps": round(b.throughput_rps, 3), "detail": b.detail,
                                 "cost_per_hour": round(b.cost_per_hour, 2)} for b in results}
    # Baselines are disaggregated constructions except the homogeneous one, which is planned in auto mode:
    # compare each with our plan in the same terms (auto covers both modes).
    best = max(b.throughput_rps for b in results)
    row["vs_best_baseline"] = round(auto.throughput_rps / best, 4) if best else None
    row["never_below_baseline"] = all(auto.throughput_rps >= b.throughput_rps * (1 - 1e-9) for b in results)
    return row


def markdown(rows: list[dict], command: str) -> str:
    short = {"best homogeneous subset": "homog.", "DistServe-style uniform": "DistServe",
             "random partition + max-flow": "random", "per-type P/D split": "per-type"}
    lines = [
        "| fleet | GPUs | solve s (CPU s) | ours req/s | exact req/s | ours/exact | ours auto (mode) | homog. "
        "| DistServe | random | per-type | auto/best baseline |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = {short[k]: v["rps"] for k, v in r["baselines"].items()}
        exact = f"{r['exact_rps']:.2f}{'' if r.get('exact_optimal') else ' (not proven)'}" if "exact_rps" in r else "-"
        ratio = f"{r['vs_exact']:.3f}" if r.get("vs_exact") else "-"
        lines.append(
            f"| {r['fleet']} | {r['gpus']} | {r['solve_s']:.2f} ({r['solve_cpu_s']:.2f}) | {r['ours_rps']:.2f} | {exact} "
            f"| {ratio} | {r['auto_rps']:.2f} ({r['auto_mode'][:5]}) | {b['homog.']:.2f} | {b['DistServe']:.2f} "
            f"| {b['random']:.2f} | {b['per-type']:.2f} | {r['vs_best_baseline']:.3f} |"
        )
    lines += ["", "ours: disaggregated heuristic (the exact optimum is disaggregated too); solve s: its wall time, "
              "CPU s: its process CPU time (the two differ when other work shares the cores); ours auto: the better "
              "of disaggregated and colocated, which the baselines are compared with.", "",
              f"Reproduce: `{command}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--time-limit", type=float, default=None,
                        help="planner time limit per solve (s); default: the CLI's (0.07 s per GPU, 4 to 25)")
    parser.add_argument("--exact-time-limit", type=float, default=300.0)
    parser.add_argument("--out", default=str(RESULTS / "planner_solve"))
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for mix in args.mixes.split(","):
            row = run_one(size, mix, args.time_limit, args.exact_time_limit)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "baselines"}), flush=True)
    command = "make setup && .venv/bin/python -m benchmarks.planner_solve" + (
        f" --sizes {args.sizes}" if args.sizes != ",".join(map(str, SIZES)) else "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {platform.python_version()}", "time_limit_s": args.time_limit,
            "command": command, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    table = markdown(rows, command)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
