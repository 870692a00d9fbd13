"""Validate the simulator against measurement on this machine's CPU.

    .venv/bin/python -m benchmarks.sim_validate                 # plain vLLM (colocated), tiny model
    .venv/bin/python -m benchmarks.sim_validate --target router # our embedded P/D cluster

1. Start the server (or use --endpoint URL of a running one).
2. Profile it at low load with the harness, in the planner's profile schema
   (`hexserve.profile`): TTFT of single requests at several prompt lengths,
   and TPOT with B requests decoding together at two context lengths
   (`--profile` takes one from `python -m planner profile` instead: both
   stream through `loadtest.client` and count tokens by its one rule).
3. Replay the Azure conversation trace (lengths clipped to the tiny model's
   window) at several rate scales and measure.
4. Simulate the same request lists on the plan the server runs (one colocated
   group for vLLM; one prefill + one decode group for the router), with costs
   from the profile (`ProfileCosts`) and from the planner's analytical model
   calibrated on the same profile (`planner.spec.calibration.fit_profile`).
5. Report the simulator's relative error on TTFT, TPOT and throughput.

Writes benchmarks/results/sim_validate.{json,md} and the profile JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

from benchmarks.loadtest_servers import router_server, tiny_model_dir, vllm_server
from common.roles import Role
from common.traces import load_trace
from loadtest.metrics import SLO
from loadtest.prompts import PromptBuilder, load_tokenizer
from loadtest.report import build_result
from loadtest.runner import RunConfig, build_prompts, run
from loadtest.workload import WorkloadConfig, build_workload
from planner.sim.costs import AnalyticCosts, ProfileCosts
from planner.sim.simulator import SimConfig, simulate
from planner.core.costmodel import Stage
from planner.sim.types import SimFleet, SimGroup, SimRoute
from planner.spec.calibration import fit_profile
from planner.spec.catalog import default_catalog
from planner.spec.model import model_preset
from planner.spec.profile import DecodeSample, PrefillSample, Profile

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "p90_tpot_ms",
           "request_throughput", "output_throughput")


def _fresh_builder(tokenizer):
    # A new seed per run: vLLM's prefix cache would otherwise serve repeated (or
    # prefix-sharing) prompts from cache, which both shortens prefill and, on the
    # CPU backend, makes some fully cached requests stream all tokens in one burst.
    _fresh_builder.seed = getattr(_fresh_builder, "seed", 20_000) + 1
    return PromptBuilder(tokenizer, "ids", seed=_fresh_builder.seed)


def _measure(url, model, builder, wcfg, concurrency=None, duration_s=60.0):
    workload = build_workload(wcfg, None if wcfg.input_len else _measure.trace)
    prompts = build_prompts(builder, workload)
    cfg = RunConfig(url, model=model, duration_s=duration_s, drain_s=60, concurrency=concurrency, progress=False)
    out = run(cfg, workload, prompts)
    return workload, out.records


def profile(url, model, tokenizer, prompt_lens, batches, contexts, output_len=48) -> dict:
    warm = WorkloadConfig(arrival="concurrency", concurrency=4, max_requests=16, input_len=256, output_len=16)
    _measure(url, model, _fresh_builder(tokenizer), warm, concurrency=4)
    prefill = []
    for s in prompt_lens:
        wcfg = WorkloadConfig(arrival="concurrency", concurrency=1, max_requests=4, input_len=s, output_len=2)
        _, recs = _measure(url, model, _fresh_builder(tokenizer), wcfg, concurrency=1)
        ttfts = [r.ttft_s for r in recs[1:] if r.success]  # the first one warms up this shape
        prefill.append({"prompt_tokens": s, "latency_ms": 1e3 * statistics.median(ttfts)})
    decode = []
    for ctx in contexts:
        for b in batches:
            wcfg = WorkloadConfig(arrival="concurrency", concurrency=b, max_requests=2 * b,
                                  input_len=ctx, output_len=output_len)
            _, recs = _measure(url, model, _fresh_builder(tokenizer), wcfg, concurrency=b)
            tpots = [r.tpot_s for r in recs if r.success and r.tpot_s]
            decode.append({"batch": b, "context_tokens": ctx + output_len / 2,
                           "step_ms": 1e3 * statistics.median(tpots)})
    return {"prefill": prefill, "decode": decode}


def _fleet(target: str, profile_costs):
    stage = (Stage(default_catalog().resolve("CPU", "gpu"), 1, 4, True, True, 1e10, 1e-6),)
    if target == "vllm":
        g = SimGroup("vllm-0", Role.COLOCATED, stage, max_batch_size=256, max_prefill_tokens=2048)
        return SimFleet("vllm", [g], [SimRoute("vllm-0", "vllm-0", 1.0, 0.0)])
    p = SimGroup("prefill-0", Role.PREFILL, stage, max_prefill_tokens=2048)
    d = SimGroup("decode-0", Role.DECODE, stage, max_batch_size=256)
    return SimFleet("embedded", [p, d], [SimRoute("prefill-0", "decode-0", 1.0, 0.0)])


def _costs(target: str, prof: dict):
    """ProfileCosts from the measured points; for the router, prefill = TTFT minus one decode step."""
    decode_pts = [{"batch": d["batch"], "context_tokens": d["context_tokens"], "step_s": d["step_ms"] / 1e3}
                  for d in prof["decode"]]
    costs = ProfileCosts.from_points(
        [{"tokens": p["prompt_tokens"], "latency_s": p["latency_ms"] / 1e3} for p in prof["prefill"]], decode_pts)
    if target == "router":
        pts = [{"tokens": p["prompt_tokens"],
                "latency_s": max(1e-4, p["latency_ms"] / 1e3 - costs.decode_step_s(None, 1, p["prompt_tokens"]))}
               for p in prof["prefill"]]
        costs = ProfileCosts.from_points(pts, decode_pts)
    return costs


def _calibrated_costs(target: str, prof: dict):
    """The planner's analytical model with mfu/mbu/overheads fitted to the same profile."""
    model = model_preset("hexserve-tiny-llama")
    cpu = default_catalog().resolve("CPU", "gpu")
    p = Profile("CPU", 1, model, tuple(PrefillSample(x["prompt_tokens"], x["latency_ms"]) for x in prof["prefill"]),
                tuple(DecodeSample(x["batch"], x["context_tokens"], x["step_ms"]) for x in prof["decode"]), {})
    fit = fit_profile(p, cpu)
    spec = replace(cpu, **fit.coefficients())
    return AnalyticCosts(model, context_bucket_tokens=16), spec, fit


def _relerr(sim, meas):
    if sim is None or meas in (None, 0):
        return None
    return (sim - meas) / meas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("vllm", "router"), default="vllm")
    ap.add_argument("--endpoint", help="use this running server instead of starting one")
    ap.add_argument("--rate-scales", default="1,2,3")
    ap.add_argument("--max-requests", type=int, default=150)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--max-input-tokens", type=int, default=768)
    ap.add_argument("--max-output-tokens", type=int, default=64)
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--profile", help="a hexserve.profile file (e.g. from `python -m planner profile --url ...`) "
                                      "to use instead of profiling with the harness")
    ap.add_argument("--out", default=str(RESULTS / "sim_validate"))
    args = ap.parse_args(argv)

    tokenizer = load_tokenizer(tiny_model_dir())
    _measure.trace = load_trace(args.trace)
    if args.endpoint:
        server = contextlib.nullcontext((args.endpoint, None))
    elif args.target == "vllm":
        server = vllm_server(port=8100)
    else:
        server = router_server(port=8300)
    rows, runs = [], []
    slo = SLO(ttft_ms=1000, tpot_ms=100)
    with server as (url, model):
        if args.profile:
            prof_doc = json.loads(Path(args.profile).read_text())
            prof = {"prefill": prof_doc["prefill"], "decode": prof_doc["decode"]}
        else:
            prof = profile(url, model, tokenizer, (32, 128, 256, 512, 768), (1, 4, 8, 16), (64, 384))
            prof_doc = {"schema": "hexserve.profile", "schema_version": 1, "gpu_type": "CPU", "tp": 1,
                        "source": {"how": "benchmarks.sim_validate via the load-test harness",
                                   "target": args.target}, **prof}
        Path(f"{args.out}_profile_{args.target}.json").write_text(json.dumps(prof_doc, indent=1))
        measured = []
        for i, scale in enumerate(float(x) for x in args.rate_scales.split(",")):
            wcfg = WorkloadConfig(arrival="trace", rate_scale=scale, max_requests=args.max_requests,
                                  duration_s=args.duration, max_input_tokens=args.max_input_tokens,
                                  max_output_tokens=args.max_output_tokens)
            load_before = os.getloadavg()[0]
            workload, recs = _measure(url, model, _fresh_builder(tokenizer), wcfg, duration_s=args.duration)
            meta = {"rate_scale": scale, "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
            measured.append((scale, workload, build_result(recs, slo, meta, per_request=False)))

    prof_costs = _costs(args.target, prof)
    an_costs, cpu_spec, fit = _calibrated_costs(args.target, prof)
    for scale, workload, meas in measured:
        fleet = _fleet(args.target, prof_costs)
        an_fleet = SimFleet(fleet.name, [SimGroup(g.name, g.role, tuple(replace(s, gpu=cpu_spec) for s in g.stages),
                                                  g.max_batch_size, g.kv_capacity_tokens, g.max_prefill_tokens)
                                         for g in fleet.groups], fleet.routes)
        sims = {
            "profile": build_result(simulate(fleet, workload, prof_costs, SimConfig()), slo, {}, per_request=False),
            "analytic": build_result(simulate(an_fleet, workload, an_costs, SimConfig()), slo, {}, per_request=False),
        }
        for kind, sim in sims.items():
            row = {"target": args.target, "rate_scale": scale, "costs": kind, "requests": meas["num_prompts"],
                   "loadavg_1m": (meas["loadavg_1m_before"] + meas["loadavg_1m_after"]) / 2}
            for m in METRICS:
                row[f"{m}_measured"] = meas[m]
                row[f"{m}_sim"] = sim[m]
                row[f"{m}_err"] = _relerr(sim[m], meas[m])
            rows.append(row)
        runs.append({"rate_scale": scale, "measured": meas, "simulated": sims})

    lines = [f"Simulator vs measurement, target `{args.target}` (tiny model on this machine's CPU; "
             f"Azure conv trace, input <= {args.max_input_tokens}, output <= {args.max_output_tokens} tokens).",
             "", "| rate scale | costs | reqs | machine load | TTFT mean meas/sim (err) | TTFT p90 meas/sim (err) | "
             "TPOT mean meas/sim (err) | TPOT p90 meas/sim (err) | throughput req/s meas/sim (err) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(r, m):
        e = r[f"{m}_err"]
        return (f"{r[f'{m}_measured']:.1f} / {r[f'{m}_sim']:.1f} ({e:+.0%})" if e is not None
                else f"{r[f'{m}_measured']} / {r[f'{m}_sim']}")

    for r in rows:
        lines.append(f"| {r['rate_scale']} | {r['costs']} | {r['requests']} | {r['loadavg_1m']:.1f} | "
                     f"{cell(r, 'mean_ttft_ms')} | "
                     f"{cell(r, 'p90_ttft_ms')} | {cell(r, 'mean_tpot_ms')} | {cell(r, 'p90_tpot_ms')} | "
                     f"{r['request_throughput_measured']:.2f} / {r['request_throughput_sim']:.2f} "
                     f"({r['request_throughput_err']:+.0%}) |")
    for kind in ("profile", "analytic"):
        errs = {m: [abs(r[f"{m}_err"]) for r in rows if r["costs"] == kind and r[f"{m}_err"] is not None]
                for m in ("mean_ttft_ms", "mean_tpot_ms", "request_throughput")}
        lines.append("")
        lines.append(f"Mean absolute error ({kind} costs): " + ", ".join(
            f"{m} {statistics.mean(v):.0%}" for m, v in errs.items() if v))
    lines.append("")
    lines.append(f"Calibration of the analytical model on this profile: mfu {fit.mfu:.4f}, mbu {fit.mbu:.4f}, "
                 f"prefill overhead {fit.prefill_overhead_ms:.1f} ms (R^2 {fit.prefill_r2:.2f}), "
                 f"decode overhead {fit.decode_overhead_ms:.2f} ms (R^2 {fit.decode_r2:.2f}).")
    md = "\n".join(lines)
    Path(f"{args.out}_{args.target}.md").write_text(md + "\n")
    Path(f"{args.out}_{args.target}.json").write_text(json.dumps(
        {"profile": prof_doc, "rows": rows, "runs": runs}, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
