"""`python -m planner simulate plan.json --trace ...`: replay a trace on a plan in simulation.

    python -m planner simulate plan.json --cluster cluster.json --trace azure-conv \\
        --rate-scale 4 --max-requests 5000 --out benchmarks/results/sim_run
    python -m planner simulate plan.json --trace azure-conv --find-max-rate   # throughput at SLO

Costs come from the planner's analytical model (with the cluster file's
catalog overrides when given), or from a measured profile (`--profile`, the
`hexserve.profile` JSON that `python -m planner profile` writes). The result
has the load-test harness's schema (`loadtest.metrics`), so a simulation and
a measurement can be compared field by field, and plotted the same way.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.cache_routing import DEFAULT_DECODE_FIRST_MAX_TOKENS, DEFAULT_SHARE_SLACK_REQUESTS
from common.plan import load_plan
from common.traces import TRACE_FORMATS, TraceError, load_trace
from loadtest.metrics import SLO
from loadtest.report import build_result, summary_table, write_result
from loadtest.workload import WorkloadConfig, build_workload
from planner.sim.costs import AnalyticCosts, ProfileCosts
from planner.sim.from_plan import fleet_from_plan
from planner.sim.routing import ROUTINGS
from planner.sim.simulator import MOONCAKE_BLOCK_TOKENS, SimConfig, simulate_with_counters
from planner.sim.sweep import max_rate_at_slo
from planner.spec.cluster import load_cluster
from planner.spec.model import model_from_fields


def add_simulate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate", help="simulate a plan under a request trace (discrete-event)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", help="plan.json from `python -m planner solve`")
    p.add_argument("--cluster", help="the cluster file the plan was solved from (links, options, catalog)")
    p.add_argument("--trace", default="azure-conv", help="trace file, or azure-conv / azure-code")
    p.add_argument("--trace-format", default="auto", choices=("auto", *TRACE_FORMATS))
    p.add_argument("--rate-scale", type=float, default=1.0, help="replay speed: 2 = twice the trace's rate")
    p.add_argument("--start-s", type=float, default=0.0)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--duration", type=float, default=3600.0, help="trace seconds (after scaling) to replay")
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-output-tokens", type=int)
    p.add_argument("--slo-ttft-ms", type=float, help="default: the plan's workload SLO")
    p.add_argument("--slo-tpot-ms", type=float, help="default: the plan's workload SLO")
    p.add_argument("--profile", help="measured profile JSON: use it instead of the analytical model")
    p.add_argument("--routing", default="plan", choices=ROUTINGS,
                   help="the router's policies: plan (default), round-robin, cache-aware; weighted: the plan's "
                        "weights alone; load_aware: old name of plan")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="model no prefix caches (by default each group caches the trace's hash_ids blocks)")
    p.add_argument("--block-tokens", type=int, default=MOONCAKE_BLOCK_TOKENS,
                   help="tokens per trace hash id (512 for Mooncake traces)")
    p.add_argument("--share-slack-requests", type=float, default=DEFAULT_SHARE_SLACK_REQUESTS,
                   help="cache-aware: how far (in requests) a route may run ahead of its share")
    p.add_argument("--decode-first-max-tokens", type=int, default=DEFAULT_DECODE_FIRST_MAX_TOKENS,
                   help="cache-aware: the decode group computes an uncached suffix this short itself (0: never)")
    p.add_argument("--find-max-rate", action="store_true", help="bisect the rate for SLO attainment >= --attainment")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX_*.png")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_simulate)
    return p


def _costs(args, model, cluster):
    if args.profile:
        data = json.loads(open(args.profile, encoding="utf-8").read())
        return ProfileCosts.from_points(
            [{"tokens": s["prompt_tokens"], "latency_s": s["latency_ms"] / 1e3} for s in data["prefill"]],
            [{"batch": s["batch"], "context_tokens": s["context_tokens"], "step_s": s["step_ms"] / 1e3}
             for s in data["decode"]])
    return AnalyticCosts(model)


def cmd_simulate(args) -> int:
    try:
        plan = load_plan(args.plan)
        cluster = load_cluster(args.cluster) if args.cluster else None
        fleet = fleet_from_plan(plan, cluster)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot simulate {args.plan}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        sim_cfg = SimConfig(routing=args.routing, prefix_caching=not args.no_prefix_caching,
                            prefix_block_tokens=args.block_tokens, share_slack_requests=args.share_slack_requests,
                            decode_first_max_tokens=args.decode_first_max_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = model_from_fields(plan.model, "plan.model")
    costs = _costs(args, model, cluster)
    slo_cfg = plan.workload.get("slo") or {}
    slo = SLO(args.slo_ttft_ms or slo_cfg.get("ttft_ms"), args.slo_tpot_ms or slo_cfg.get("tpot_ms"))
    try:
        trace = load_trace(args.trace, args.trace_format)
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wcfg = WorkloadConfig(arrival="trace", rate_scale=args.rate_scale, start_s=args.start_s,
                          max_requests=args.max_requests, duration_s=args.duration,
                          max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens)
    meta = {"source": "simulation", "plan": str(args.plan), "trace": args.trace, "fleet": fleet.name,
            "num_gpus": fleet.num_gpus, "cost_per_hour": fleet.price_per_hour,
            "costs": "profile" if args.profile else "analytic", "routing": args.routing}
    if args.find_max_rate:
        best = max_rate_at_slo(fleet, trace, costs, slo, wcfg, target=args.attainment, routing=args.routing,
                               cfg=sim_cfg)
        if best is None:
            print(f"the plan misses {args.attainment:.0%} SLO attainment even at the lowest rate tried")
            return 1
        print(f"throughput at SLO ({args.attainment:.0%} attainment): {best.result['request_throughput']:.2f} req/s "
              f"(offered {best.rate_rps:.2f} req/s, rate scale {best.rate_scale:.3f})")
        result = {**meta, **best.result, "offered_rate_rps": best.rate_rps}
    else:
        workload = build_workload(wcfg, trace)
        sim_cfg.keep_itls = len(workload) <= 20_000
        records, counters = simulate_with_counters(fleet, workload, costs, sim_cfg)
        result = build_result(records, slo, meta)
        result.update(counters.to_json())
    print(f"prefix caches (all groups): {result['prompt_tokens_computed_all_groups']} prompt tokens computed, "
          f"hit rate {result['prefix_hit_rate_all_groups']:.1%}, {result['decode_first_requests']} requests "
          "decode-first")
    print(summary_table(result))
    if args.out:
        paths = write_result(result, args.out, plots=not args.no_plots)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m planner.adapters.simulate_cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
