"""The planner's command line: one function per subcommand, and the parser that names them.

``planner/__main__.py`` runs it; ``simulate`` lives in ``simulate_cli``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.plan import Plan, format_table
from planner.adapters.control_cli import add_control_parser
from planner.adapters.estimate_cli import add_estimate_parser
from planner.adapters.profiler import ProfileSettings, run_profile
from planner.adapters.simulate_cli import add_simulate_parser
from planner.core.right_size import DEFAULT_HEADROOM
from planner.core.solver import DEFAULT_TIME_LIMIT_S, MODES, solve, solve_exact_plan
from planner.sim.right_size_check import checked_right_size
from planner.spec.calibration import fit_profile
from planner.spec.catalog import default_catalog
from planner.spec.cluster import load_cluster
from planner.spec.errors import PlanInputError
from planner.spec.model import model_preset, preset_names
from planner.spec.profile import Profile, load_profile


def _solved(args: argparse.Namespace, cluster) -> Plan:
    if args.objective == "cost":
        for flag, given in (("--budget", args.budget is not None), ("--solver exact", args.solver == "exact")):
            if given:  # refused, never silently ignored
                raise PlanInputError("--objective", f"--objective cost finds the cheapest GPUs itself; drop {flag}")
        return checked_right_size(cluster, headroom=args.headroom, mode=args.mode, seed=args.seed,
                                  time_limit_s=args.time_limit)
    if args.solver == "exact":
        mode = "disaggregated" if args.mode == "auto" else args.mode
        return solve_exact_plan(cluster, mode, time_limit_s=args.time_limit or 120.0)
    return solve(cluster, mode=args.mode, seed=args.seed, time_limit_s=args.time_limit, budget_per_hour=args.budget)


def right_sizing_lines(plan: Plan) -> list[str]:
    """What right-sizing chose and what it leaves free (empty for other plans)."""
    info = plan.solver.get("right_sizing")
    if not info:
        return []
    gpus = ", ".join(f"{n} {t}" for t, n in info["serving_gpus"].items())
    released = ", ".join(f"{n} {t}" for t, n in info["released_gpus"].items()) or "nothing"
    verdict = "meets" if info["meets_target"] else "does NOT meet (the whole fleet is planned)"
    return [f"right-sized: {plan.throughput_rps:.2f} req/s {verdict} the target {info['target_rps']:.2f} "
            f"(arrival rate + {100 * info['headroom']:.0f} % headroom) on {gpus}: "
            f"${info['serving_cost_per_hour']:.2f}/h of the fleet's ${info['fleet_cost_per_hour']:.2f}/h",
            f"  could be released: {released} (${info['released_cost_per_hour']:.2f}/h)",
            "  " + _simulation_line(info)]


def _simulation_line(info: dict) -> str:
    if info.get("holds_in_simulation") is None:
        return "not checked in simulation: the workload gives means, not a trace to replay"
    verdict = "holds" if info["holds_in_simulation"] else "does NOT hold"
    tries = len(info["simulation_checks"])
    return (f"{verdict} on the trace in simulation: {100 * info['simulated_slo_attainment']:.1f} % of requests meet "
            f"both SLOs (target {100 * info['simulation_target']:.0f} %) with a {100 * info['headroom']:.0f} % "
            f"capacity margin, after {tries} simulated {'try' if tries == 1 else 'tries'}")


def cmd_solve(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.cluster)
    plan = _solved(args, cluster)
    if args.out:
        plan.write(args.out)
    if args.plot:
        # matplotlib takes about a second to import: only `--plot` pays for it.
        from planner.adapters.plot import plot_plan

        plot_plan(cluster, plan, args.plot)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    elif not args.quiet:
        print(format_table(plan))
        for line in right_sizing_lines(plan):
            print(line)
        if args.out:
            print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise PlanInputError(flag, f"is {text!r}; give whole numbers separated by commas, e.g. 1,2,4") from None


def cmd_profile(args: argparse.Namespace) -> int:
    settings = ProfileSettings(
        url=args.url,
        gpu_type=args.gpu_type,
        model_name=args.served_model,
        prompt_lengths=_int_list(args.prompt_lengths, "--prompt-lengths"),
        batch_sizes=_int_list(args.batch_sizes, "--batch-sizes"),
        decode_tokens=args.decode_tokens,
        decode_prompt_lengths=_int_list(args.decode_prompt_lengths, "--decode-prompt-lengths"),
        repeats=args.repeats,
        tp=args.tp,
        timeout_s=args.timeout,
    )
    profile = run_profile(settings, hf_config=args.hf_config, preset=args.preset)
    Path(args.out).write_text(json.dumps(profile.to_json(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(profile.prefill)} prefill and {len(profile.decode)} decode samples")
    return print_fit(profile, args.cluster)


def print_fit(profile: Profile, cluster_path: str | None = None) -> int:
    """The profile's fitted coefficients; its GPU type from the catalog, or from a cluster file's own types."""
    catalog = (load_cluster(cluster_path).catalog if cluster_path else None) or default_catalog()
    spec = catalog.resolve(profile.gpu_type, "gpu_type")
    fit = fit_profile(profile, spec)
    print(f"fitted for {spec.name}: mfu {fit.mfu:.4f}, mbu {fit.mbu:.4f}, prefill overhead "
          f"{fit.prefill_overhead_ms:.2f} ms (R^2 {fit.prefill_r2:.3f}), decode overhead "
          f"{fit.decode_overhead_ms:.2f} ms + {fit.decode_seq_overhead_ms:.2f} ms per request (R^2 {fit.decode_r2:.3f})")
    print(json.dumps({"catalog": {spec.name: {k: round(v, 6) for k, v in fit.coefficients().items()}}}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    return print_fit(load_profile(Path(args.profile), field=args.profile), args.cluster)


def cmd_catalog(args: argparse.Namespace) -> int:
    cat = default_catalog()
    print(f"{'GPU':<10}{'bf16 TFLOPS':>12}{'GiB':>6}{'GB/s':>7}{'$/h':>7}  cost model")
    for name in cat.names():
        g = cat.gpus[name]
        form = "fitted" if g.fitted else f"roofline (mfu {g.mfu:g}, mbu {g.mbu:g})"
        print(f"{name:<10}{g.peak_bf16_tflops:>12.1f}{g.memory_gib:>6.0f}{g.memory_bandwidth_gb_per_s:>7.0f}"
              f"{g.price_per_hour:>7.2f}  {form}")
    print("\nprices ($/GPU-hour on demand; set what you pay under the cluster file's catalog):")
    for name in cat.names():
        print(f"  {name:<10}{cat.gpus[name].price_per_hour:>6.2f}  {cat.gpus[name].price_source or 'nominal, no public offer'}")
    print("\nmodel presets:")
    for name in preset_names():
        m = model_preset(name)
        print(f"  {name:<22} {m.num_layers:>3} layers, hidden {m.hidden_size}, {m.num_attention_heads}/"
              f"{m.num_key_value_heads} heads, {m.weight_bytes / 1024**3:.1f} GiB {m.dtype}")
    return 0


def _add_solve_parser(sub) -> None:
    p = sub.add_parser("solve", help="plan a cluster file and write plan.json")
    p.add_argument("cluster", help="cluster.json (schema in the README)")
    p.add_argument("--out", default="plan.json", help="plan file to write (default: plan.json; '' to skip)")
    p.add_argument("--plot", default=None, help="also draw the GPU graph by group with KV routes (PNG)")
    p.add_argument("--mode", default="auto", choices=MODES)
    p.add_argument("--solver", default="heuristic", choices=("heuristic", "exact"),
                   help="exact: OR-Tools optimum, for fleets of at most 16 GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None,
                   help=f"seconds (default: 0.07 per GPU, between 4 and {DEFAULT_TIME_LIMIT_S:g})")
    p.add_argument("--budget", type=float, default=None, help="price budget, $/hour (overrides the workload's)")
    p.add_argument("--objective", default="throughput", choices=("throughput", "cost"),
                   help="cost: the cheapest part of the fleet that serves workload.arrival_rate_rps (plus "
                        "--headroom) at the SLOs, and what the rest could be released for")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"with --objective cost: capacity above the arrival rate (default {DEFAULT_HEADROOM:g})")
    p.add_argument("--json", action="store_true", help="print the plan JSON instead of the table")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_solve)


def _add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure a running vLLM OpenAI server and write a profile file")
    p.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8100")
    p.add_argument("--gpu-type", required=True, help="catalog type the server runs on (CPU here)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--hf-config", help="the served model's folder or config.json")
    group.add_argument("--preset", help="the served model's preset name")
    p.add_argument("--served-model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--prompt-lengths", default="16,64,128,256,384")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-prompt-lengths", default="32",
                   help="prompt lengths to decode after; two or more fit a step's per-request cost apart from "
                        "its KV reads (e.g. 32,256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default="profile.json")
    p.add_argument("--cluster", default=None, help="a cluster file whose catalog defines --gpu-type (e.g. a lab's)")
    p.set_defaults(func=cmd_profile)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m planner", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_solve_parser(sub)
    _add_profile_parser(sub)
    p = sub.add_parser("calibrate", help="fit cost-model coefficients to a profile file and print them")
    p.add_argument("profile")
    p.add_argument("--cluster", default=None, help="a cluster file whose catalog defines the profile's GPU type")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("catalog", help="list GPU types and model presets")
    p.set_defaults(func=cmd_catalog)
    add_simulate_parser(sub)
    add_estimate_parser(sub)
    add_control_parser(sub)
    return parser
