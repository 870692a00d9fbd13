"""Fleet-scale simulation, HexGen-2 style: heterogeneous vs homogeneous fleets at one price.

    .venv/bin/python -m benchmarks.sim_fleet            # ~3-5 min on 2 CPU cores
    .venv/bin/python -m benchmarks.sim_fleet --quick    # fewer requests, coarser search

Llama-2-70B on the Azure LLM conversation trace (2023). Fleets:
- hetero: 4x H100 + 4x A100-80G + 8x L40 + 8x A6000 (24 GPUs),
- homogeneous H100 and A100-80G fleets at about the same $/hour.

Every plan is made for the requests replayed (the planner reads them as a
trace; the baselines are sized from their mean lengths). Plans, all
simulated with the same discrete-event simulator and the same
analytical cost model (`planner.sim.costs.AnalyticCosts`):
- ours: `planner.core.solver.solve` (graph partition + max-flow + refinement),
  disaggregated or colocated as it chooses;
- HexGen-like: the planner restricted to colocated groups (heterogeneous,
  asymmetric parallelism, no disaggregation);
- DistServe-like: uniform TP-4 groups of one GPU type, the prefill:decode
  count that balances capacity (`benchmarks.sim_baselines.distserve_plan`);
- vLLM-like: one colocated TP-4 replica per 4 GPUs, requests split by
  capacity (`benchmarks.sim_baselines.colocated_plan`).

Reported per plan: the highest arrival rate at which >= 90 % of requests meet
both SLOs (throughput at SLO) with our router's load-aware routing and with
the plan's weights alone, that rate per $/hour, and latency at the trace's
own rate. Writes benchmarks/results/sim_fleet.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.sim_baselines import MeanLengths, colocated_plan, distserve_plan
from common.roles import Role
from common.traces import SHARED_TRACES_DIR, load_trace
from loadtest.metrics import SLO
from loadtest.workload import WorkloadConfig
from planner.core.solver import solve
from planner.sim.build import make_group, make_route
from planner.sim.costs import AnalyticCosts
from planner.sim.from_plan import fleet_from_plan
from planner.sim.sweep import max_rate_at_slo, run_at
from planner.spec.catalog import default_catalog
from planner.spec.cluster import parse_cluster
from planner.spec.model import model_preset

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "Llama-2-70B"
SLO_TTFT_MS, SLO_TPOT_MS = 2000.0, 100.0
INTER_NODE_GB_PER_S = 25.0  # 200 Gbit/s between nodes
# Llama-2-70B has a 4096-token window: replayed prompts are clipped to leave room for the longest output.
MAX_INPUT_TOKENS, MAX_OUTPUT_TOKENS = 4096 - 512, 512

FLEETS = {
    "hetero": [("H100", 4), ("A100-80G", 4), ("L40", 8), ("A6000", 8)],
    "homo-H100": [("H100", 8), ("H100", 4)],
    "homo-A100": [("A100-80G", 8), ("A100-80G", 8), ("A100-80G", 4)],
}


def cluster_doc(name: str, nodes: list[tuple[str, int]], trace: dict | None = None) -> dict:
    """The fleet's cluster file; its workload is the conversation trace (or `trace`: {"path", "format"})."""
    trace = trace or {"path": str(SHARED_TRACES_DIR / "azure_llm_2023_conv.csv"), "format": "azure"}
    return {
        "schema": "hexserve.cluster", "schema_version": 1, "name": name,
        "fleet": {"nodes": [{"name": f"{t.lower()}-{i}", "gpu_type": t, "num_gpus": n}
                            for i, (t, n) in enumerate(nodes)]},
        "network": {"inter_node": {"bandwidth_gb_per_s": INTER_NODE_GB_PER_S, "latency_us": 15}},
        "model": {"preset": MODEL},
        "workload": {"trace": trace, "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS}},
    }


def replayed_trace(requests: list, path: Path) -> dict:
    """The requests the simulation replays, clipped as it clips them, as a trace file for the planner: the
    plan is made for the workload it is measured on, as the baselines are sized from its means."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps({"timestamp": r.arrival_s * 1e3,
                                 "input_length": min(r.input_tokens, MAX_INPUT_TOKENS),
                                 "output_length": max(1, min(r.output_tokens, MAX_OUTPUT_TOKENS))}) + "\n")
    return {"path": str(path), "format": "mooncake"}


def tp4_groups(model, nodes: list[tuple[str, int]]):
    """One TP-4 replica per 4 GPUs of a node (what a vLLM user would deploy for a 70B model)."""
    cat = default_catalog()
    groups = []
    for i, (t, n) in enumerate(nodes):
        for k in range(n // 4):
            groups.append((f"{t.lower()}-{i}-r{k}", i, make_group(f"{t.lower()}-{i}-r{k}", Role.DECODE, model,
                                                                   [(cat.resolve(t, "gpu"), 4, model.num_layers)])))
    return groups


def kv_route_fn(model, node_of: dict[str, int]):
    def route(p, d):
        same_node = node_of[p.name] == node_of[d.name]
        bw = p.stages[0].gpu.intra_node_bandwidth_gb_per_s if same_node else INTER_NODE_GB_PER_S
        return make_route(model, p, d, 1.0, bw)
    return route


def make_plans(args, model, costs, first, means) -> list[tuple]:
    """(fleet name, plan label, SimFleet, solve seconds, planner-predicted req/s) per fleet and plan."""
    plans = []
    with tempfile.TemporaryDirectory() as workdir:  # the clusters read the trace when they are parsed
        replayed = replayed_trace(first, Path(workdir) / "replayed.jsonl")
        clusters = {fname: parse_cluster(cluster_doc(fname, nodes, replayed), base_dir=".")
                    for fname, nodes in FLEETS.items()}
    for fname, nodes in FLEETS.items():
        cluster = clusters[fname]
        t0 = time.time()
        plan = solve(cluster, mode="auto", time_limit_s=args.solve_time_limit)
        plans.append((fname, f"ours ({plan.mode})", fleet_from_plan(plan, cluster), time.time() - t0,
                      plan.predicted.throughput_rps))
        if fname == "hetero":
            t0 = time.time()
            colo = solve(cluster, mode="colocated", time_limit_s=args.solve_time_limit)
            plans.append((fname, "HexGen-like (planner, colocated)", fleet_from_plan(colo, cluster),
                          time.time() - t0, colo.predicted.throughput_rps))
        groups = tp4_groups(model, nodes)
        node_of = {name: i for name, i, _ in groups}
        sim_groups = [g for _, _, g in groups]
        plans.append((fname, "vLLM-like (TP-4 replicas)", colocated_plan(sim_groups, costs, means), 0.0, None))
        if fname != "hetero":
            plans.append((fname, "DistServe-like (uniform TP-4)",
                          distserve_plan(sim_groups, costs, means, kv_route_fn(model, node_of)), 0.0, None))
    return plans


def measure(args, plans, trace, costs, slo, wcfg) -> tuple[list[dict], float]:
    """Each plan's rate at the SLO (router-like and plan-weight routing) and latency at the trace's rate."""
    native_rps = None
    rows = []
    for fname, label, fleet, solve_s, predicted in plans:
        t0 = time.time()
        best = max_rate_at_slo(fleet, trace, costs, slo, wcfg, target=0.9,
                               iterations=8 if args.quick else 12)
        # The same plan with the plan's weights alone (no live-load term).
        best_w = max_rate_at_slo(fleet, trace, costs, slo, wcfg, target=0.9,
                                 iterations=8 if args.quick else 12, routing="weighted")
        at_native = run_at(fleet, trace, costs, slo, wcfg, 1.0)
        native_rps = native_rps or at_native.rate_rps
        r = at_native.result
        row = {
            "fleet": fname, "plan": label, "gpus": fleet.num_gpus, "cost_per_hour": round(fleet.price_per_hour, 2),
            "groups": {g.role: sum(1 for x in fleet.groups if x.role == g.role) for g in fleet.groups},
            "rate_at_slo_rps": best.rate_rps if best else 0.0,
            "goodput_at_slo_rps": best.result["request_goodput"] if best else 0.0,
            "rate_at_slo_weighted_routing_rps": best_w.rate_rps if best_w else 0.0,
            "rate_at_slo_per_dollar": (best.rate_rps if best else 0.0) / fleet.price_per_hour,
            "planner_predicted_rps": predicted,
            "native_rate_rps": at_native.rate_rps,
            "native_slo_attainment": r["slo_attainment"],
            "native_mean_ttft_ms": r["mean_ttft_ms"], "native_p90_ttft_ms": r["p90_ttft_ms"],
            "native_mean_tpot_ms": r["mean_tpot_ms"], "native_p90_tpot_ms": r["p90_tpot_ms"],
            "native_mean_e2el_ms": r["mean_e2el_ms"],
            "solve_s": round(solve_s, 1), "sim_s": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(f"{fname:10s} {label:36s} {row['gpus']:3d} GPUs ${row['cost_per_hour']:6.2f}/h  "
              f"rate@SLO {row['rate_at_slo_rps']:6.2f} req/s  ({row['sim_s']} s)", flush=True)

    return rows, native_rps


def markdown_table(args, rows: list[dict], native_rps: float) -> str:
    base = max((r for r in rows if r["fleet"] != "hetero"), key=lambda r: r["rate_at_slo_per_dollar"])
    lines = [
        f"{MODEL}, Azure LLM conversation trace (first {args.max_requests} requests, replayed faster until "
        f"fewer than 90 % meet TTFT <= {SLO_TTFT_MS:.0f} ms and TPOT <= {SLO_TPOT_MS:.0f} ms). "
        f"Latency columns at the trace's own rate ({native_rps:.2f} req/s). Simulated; analytical cost model.",
        "",
        "| fleet | plan | GPUs | $/h | groups | rate at SLO (req/s) | per $/h | vs best homogeneous | "
        "rate at SLO, plan weights only | planner predicted (req/s) | TTFT mean / p90 (ms) | TPOT mean / p90 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        groups = ", ".join(f"{n} {k}" for k, n in r["groups"].items())
        pred = f"{r['planner_predicted_rps']:.1f}" if r["planner_predicted_rps"] is not None else "-"
        lines.append(
            f"| {r['fleet']} | {r['plan']} | {r['gpus']} | {r['cost_per_hour']:.2f} | {groups} | "
            f"{r['rate_at_slo_rps']:.2f} | {r['rate_at_slo_per_dollar']:.3f} | "
            f"{r['rate_at_slo_per_dollar'] / base['rate_at_slo_per_dollar']:.2f}x | "
            f"{r['rate_at_slo_weighted_routing_rps']:.2f} | {pred} | "
            f"{r['native_mean_ttft_ms']:.0f} / {r['native_p90_ttft_ms']:.0f} | "
            f"{r['native_mean_tpot_ms']:.1f} / {r['native_p90_tpot_ms']:.1f} |")
    lines += ["", f"'vs best homogeneous': throughput at SLO per $/hour relative to {base['plan']} on {base['fleet']}. "
              "Routing as our router does it (plan weight / (1 + each worker's outstanding tokens / (4096 x its share of the flow)), smooth WRR); "
              "'plan weights only' drops the load term."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-requests", type=int, default=4000)
    ap.add_argument("--solve-time-limit", type=float, default=20.0)
    ap.add_argument("--out", default=str(RESULTS / "sim_fleet"))
    args = ap.parse_args(argv)
    if args.quick:
        args.max_requests, args.solve_time_limit = 1500, 8.0

    model = model_preset(MODEL)
    costs = AnalyticCosts(model)
    trace = load_trace("azure-conv")
    wcfg = WorkloadConfig(arrival="trace", max_requests=args.max_requests, duration_s=1e9,
                          max_input_tokens=MAX_INPUT_TOKENS, max_output_tokens=MAX_OUTPUT_TOKENS)
    slo = SLO(SLO_TTFT_MS, SLO_TPOT_MS)
    first = trace[: args.max_requests]
    means = MeanLengths(sum(min(r.input_tokens, MAX_INPUT_TOKENS) for r in first) / len(first),
                        sum(max(1, min(r.output_tokens, MAX_OUTPUT_TOKENS)) for r in first) / len(first),
                        SLO_TPOT_MS / 1e3)

    plans = make_plans(args, model, costs, first, means)
    rows, native_rps = measure(args, plans, trace, costs, slo, wcfg)
    md = markdown_table(args, rows, native_rps)
    Path(args.out + ".md").write_text(md + "\n")
    Path(args.out + ".json").write_text(json.dumps({
        "model": MODEL, "slo": {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS}, "max_requests": args.max_requests,
        "fleets": FLEETS, "rows": rows}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
