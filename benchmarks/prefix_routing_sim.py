"""The simulator against benchmarks.prefix_routing: the same requests, simulated, next to what was measured.

benchmarks.prefix_routing measures a real router with 2 prefill + 1 decode
workers of the tiny model on this machine's CPU (KV blocks of 32 tokens),
replaying the Mooncake trace (hash-id blocks scaled to 32 tokens, from
--start-s 900) under plan, round-robin and cache-aware routing, and the Azure
conversation trace under plan and cache-aware. This module builds the very
same request list (`loadtest.workload.build_workload` with the WorkloadConfig
the load-test CLI makes from that benchmark's flags), simulates it on a
SimFleet of the same shape (p0->d0, p1->d0, weight 1) with per-group prefix
caches and the router's policy by name (`planner.sim.simulator`), with costs
from the measured CPU profile (benchmarks/results/sim_validate_profile_router.json,
as benchmarks.sim_validate builds them), and compares per (trace, policy):
prompt tokens computed, prefix hit rate, decode-first count, TTFT p50, TPOT
mean and throughput.

Two simulated views of the prefixes:

- "trace ids": the simulator's own, the trace's hash ids (a block of 32
  tokens each, the last one usually partial);
- "engine blocks": the hash ids replaced by what the engine can actually
  hit: chained keys of the full 32-token blocks of the token ids the load
  test sends (a BOS first, so the trace's blocks sit one token off the
  engine's), at most (prompt - 1) // 32 of them (vLLM never counts the last
  prompt token as cached, and hits whole blocks only).

Every group's KV capacity is the real workers' 1 GiB (VLLM_CPU_KVCACHE_SPACE=1)
in tokens of the tiny model, so nothing evicts over 300 requests.

    .venv/bin/python -m benchmarks.prefix_routing_sim [--measured benchmarks/results/prefix_routing.json]

Writes benchmarks/results/prefix_routing_sim.{json,md} and prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from common.roles import Role
from common.traces import MOONCAKE_BLOCK_TOKENS, load_trace
from loadtest.metrics import SLO
from loadtest.report import build_result
from loadtest.workload import PlannedRequest, WorkloadConfig, build_workload
from planner.core.costmodel import Stage
from planner.sim.costs import ProfileCosts
from planner.sim.simulator import SimConfig, simulate_with_counters
from planner.sim.types import SimFleet, SimGroup, SimRoute
from planner.spec.catalog import default_catalog
from planner.spec.model import model_preset

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = RESULTS / "sim_validate_profile_router.json"
MEASURED = RESULTS / "prefix_routing.json"
BLOCK_TOKENS = 32  # the engines' KV block and the trace's scaled hash-id block
MAX_INPUT_TOKENS = 960
LOADTEST_DURATION_S = 300.0  # the load-test CLI's --duration default, which prefix_routing keeps
WORKER_KV_GIB = 1  # engine.config.DEFAULT_CPU_KVCACHE_GIB: each worker's VLLM_CPU_KVCACHE_SPACE
DECODE_MAX_BATCH = 64  # engine.config: max_num_seqs
PREFILL_TOKEN_BUDGET = 2048  # as benchmarks.sim_validate
TRACE_FILES = {"mooncake": "mooncake_synthetic.jsonl", "azure-conv": "azure-conv"}
RUNS = (("mooncake", "plan"), ("mooncake", "round-robin"), ("mooncake", "cache-aware"),
        ("azure-conv", "plan"), ("azure-conv", "cache-aware"))
VIEWS = ("trace ids", "engine blocks")
METRICS = (("prompt_tokens_computed", "prompt tokens computed"), ("prompt_cache_hit_rate", "hit rate"),
           ("decode_first_requests", "decode-first"), ("p50_ttft_ms", "TTFT p50 ms"),
           ("mean_tpot_ms", "TPOT mean ms"), ("request_throughput", "req/s"))


NOTES = """meas: benchmarks/results/prefix_routing.json (the engines' own counts over every worker, decode-first
included); sim: the simulator on the trace's hash ids; sim-eb: on the engine's full-block keys of the token
ids sent (module docstring). Errors are (sim - meas) / meas. The simulator's view of every cache is instant and
exact; the router routes on its index of the engines' KV events (asynchronous, whole 32-token blocks). The
decode step's context term comes from a profile measured at one context length (48 tokens), so the fit cannot
tell per-request from per-context-token cost and TPOT at ~500-token contexts is extrapolated (see the
diagnostic). The simulated groups never share a CPU; the three real engines, the router and the load client
share this machine's 2 cores, which the TTFT tails show. Throughput is the arrival rate (open loop, all done)."""


def kv_capacity_tokens() -> int:
    """Tokens of the tiny model's KV cache in a worker's 1 GiB (K and V, every layer, float32)."""
    return (WORKER_KV_GIB << 30) // model_preset("hexserve-tiny-llama").kv_bytes_per_token


def build_requests(trace: str, args) -> list[PlannedRequest]:
    """The request list `python -m loadtest run` builds for benchmarks.prefix_routing's flags."""
    mooncake = trace == "mooncake"
    wcfg = WorkloadConfig(arrival="trace", rate_scale=args.rate_scale, start_s=args.start_s if mooncake else 0.0,
                          max_requests=args.requests, duration_s=LOADTEST_DURATION_S,
                          max_input_tokens=MAX_INPUT_TOKENS, max_output_tokens=args.output_tokens,
                          block_tokens=BLOCK_TOKENS if mooncake else MOONCAKE_BLOCK_TOKENS, seed=0)
    return build_workload(wcfg, load_trace(TRACE_FILES[trace]))


def engine_block_requests(requests: list[PlannedRequest], trace: str) -> list[PlannedRequest]:
    """The requests with hash ids replaced by chained keys of the full KV blocks the engine can hit in
    the token ids the load test sends (--prompt-seed 0, token-id prompts)."""
    from benchmarks.loadtest_servers import tiny_model_dir
    from loadtest.prompts import PromptBuilder, load_tokenizer

    block_tokens = BLOCK_TOKENS if trace == "mooncake" else MOONCAKE_BLOCK_TOKENS
    builder = PromptBuilder(load_tokenizer(tiny_model_dir()), "ids", 0, block_tokens=block_tokens)
    out = []
    for r in requests:
        ids = builder.build(r.index, r.input_tokens, r.hash_ids).prompt
        keys, key = [], 0
        for k in range((len(ids) - 1) // BLOCK_TOKENS):  # vLLM: a hit leaves the last prompt token to compute
            key = hash((key, tuple(ids[k * BLOCK_TOKENS:(k + 1) * BLOCK_TOKENS])))
            keys.append(key)
        out.append(replace(r, hash_ids=tuple(keys)))
    return out


def build_fleet(kv_tokens: int) -> SimFleet:
    """2 prefill + 1 decode CPU groups, routes p0->d0 and p1->d0 of weight 1; the KV transfer is in the
    profile's prefill time (measured as TTFT minus one decode step through the router)."""
    stage = (Stage(default_catalog().resolve("CPU", "gpu"), 1, 4, True, True, 1e10, 1e-6),)
    groups = [SimGroup(f"p{i}", Role.PREFILL, stage, kv_capacity_tokens=kv_tokens,
                       max_prefill_tokens=PREFILL_TOKEN_BUDGET) for i in range(2)]
    groups.append(SimGroup("d0", Role.DECODE, stage, max_batch_size=DECODE_MAX_BATCH, kv_capacity_tokens=kv_tokens))
    return SimFleet("prefix-routing-cpu", groups, [SimRoute(f"p{i}", "d0", 1.0, 0.0) for i in range(2)])


def router_profile_costs(path: Path) -> ProfileCosts:
    from benchmarks.sim_validate import _costs  # the same fit sim_validate validated

    doc = json.loads(path.read_text())
    return _costs("router", {"prefill": doc["prefill"], "decode": doc["decode"]})


def context_free_costs(costs: ProfileCosts, path: Path) -> ProfileCosts | None:
    """A diagnostic, not the result: when every decode point of the profile has one context length, the
    fit cannot tell a step's per-request cost from its per-context-token cost (the two columns are
    proportional) and least squares splits the slope between them; this puts it all on the batch size.
    None when the profile has several context lengths (the split is then measured)."""
    contexts = {d["context_tokens"] for d in json.loads(path.read_text())["decode"]}
    if len(contexts) != 1:
        return None
    a, per_request_s, per_context_token_s = costs.decode_coef
    return replace(costs, decode_coef=[a, per_request_s + per_context_token_s * contexts.pop(), 0.0])


def simulate_run(requests: list[PlannedRequest], policy: str, costs: ProfileCosts, kv_tokens: int,
                 slo: SLO) -> dict:
    cfg = SimConfig(routing=policy, prefix_block_tokens=BLOCK_TOKENS, decode_first_max_tokens=64,
                    share_slack_requests=8)
    records, counters = simulate_with_counters(build_fleet(kv_tokens), requests, costs, cfg)
    summary = build_result(records, slo, {}, per_request=False)
    side = counters.to_json()
    return {"prefill_tokens_computed": side["prefill_tokens_computed"],
            "prefill_prompt_tokens": side["prefix_cache"].get("prefill", {}).get("queries", 0),
            "prompt_tokens_computed": counters.computed_tokens,
            "prompt_tokens_cached": counters.prompt_tokens - counters.computed_tokens,
            "prompt_cache_hit_rate": counters.hit_rate, "decode_first_requests": counters.decode_first_requests,
            "requests_per_route": dict(sorted(Counter(r.route for r in records).items())),
            **{k: summary[k] for k in ("completed", "failed", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                                       "request_throughput")}}


def _relerr(sim, meas):
    return None if sim is None or not meas else (sim - meas) / meas


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():  # the measured counts are floats from /metrics
        value = int(value)
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:.3f}"
    return f"{value:,.0f}"


def table(rows: list[dict]) -> str:
    head = "| trace | routing | " + " | ".join(f"{label} meas / sim / sim-eb (err, err-eb)" for _, label in METRICS)
    lines = [head + " |", "|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        cells = []
        for key, _ in METRICS:
            meas, sims = row["measured"].get(key) if row["measured"] else None, [row[v][key] for v in VIEWS]
            errs = " ".join(f"{e:+.0%}" if e is not None else "-" for e in (_relerr(s, meas) for s in sims))
            cells.append(f"{_fmt(meas)} / {_fmt(sims[0])} / {_fmt(sims[1])} ({errs})")
        lines.append(f"| {row['trace']} | {row['policy']} | " + " | ".join(cells) + " |")
    lines += ["", "| trace | routing | sim requests per route, decode-first included (trace ids) | "
              "prefill workers' tokens computed meas / sim / sim-eb | TTFT p99 ms meas / sim |",
              "|---|---|---|---|---|"]
    for row in rows:
        routes = ", ".join(f"{k} {v}" for k, v in row["trace ids"]["requests_per_route"].items())
        meas = row["measured"] or {}
        prefill = " / ".join(_fmt(x) for x in (meas.get("prefill_tokens_computed"),
                                                *(row[v]["prefill_tokens_computed"] for v in VIEWS)))
        lines.append(f"| {row['trace']} | {row['policy']} | {routes} | {prefill} | "
                     f"{_fmt(meas.get('p99_ttft_ms'))} / {_fmt(row['trace ids']['p99_ttft_ms'])} |")
    diag = [r for r in rows if "diagnostic_context_free_decode" in r]
    if diag:
        lines += ["", "Diagnostic (engine blocks): the decode fit's slope all on the batch size, none on context "
                  "(the profile's decode points share one context length, so it cannot tell them apart):", "",
                  "| trace | routing | TPOT mean ms meas / sim | TTFT p50 ms meas / sim |", "|---|---|---|---|"]
        for r in diag:
            meas, d = r["measured"] or {}, r["diagnostic_context_free_decode"]
            lines.append(f"| {r['trace']} | {r['policy']} | {_fmt(meas.get('mean_tpot_ms'))} / "
                         f"{_fmt(d['mean_tpot_ms'])} | {_fmt(meas.get('p50_ttft_ms'))} / {_fmt(d['p50_ttft_ms'])} |")
    return "\n".join(lines + ["", NOTES]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", default=str(MEASURED), help="benchmarks.prefix_routing's result")
    ap.add_argument("--profile", default=str(PROFILE), help="the router's CPU profile (benchmarks.sim_validate)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate-scale", type=float, default=0.5)
    ap.add_argument("--start-s", type=float, default=900.0)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "prefix_routing_sim"))
    args = ap.parse_args(argv)
    measured_path = Path(args.measured)
    measured = {}
    if measured_path.exists():
        doc = json.loads(measured_path.read_text())
        keep = [k for k, _ in METRICS] + ["prompt_tokens_cached", "completed", "failed", "p99_ttft_ms",
                                                   "prefill_tokens_computed", "prefix_cache"]
        measured = {(r["trace"], r["policy"]): {k: r.get(k) for k in keep} for r in doc["runs"]}
        # Simulate what was measured: the measured run's own flags win over the defaults.
        for key in ("requests", "rate_scale", "start_s", "output_tokens"):
            setattr(args, key, doc.get("args", {}).get(key, getattr(args, key)))
    else:
        print(f"{measured_path} not found: simulating only (run benchmarks.prefix_routing to measure)")
    costs, kv_tokens = router_profile_costs(Path(args.profile)), kv_capacity_tokens()
    slo = SLO(ttft_ms=2000.0, tpot_ms=200.0)  # benchmarks.prefix_routing's defaults
    flat_costs = context_free_costs(costs, Path(args.profile))
    rows, workloads = [], {}
    for trace, policy in RUNS:
        if trace not in workloads:
            reqs = build_requests(trace, args)
            workloads[trace] = {"trace ids": reqs, "engine blocks": engine_block_requests(reqs, trace)}
        row = {"trace": trace, "policy": policy, "measured": measured.get((trace, policy))}
        for view in VIEWS:
            row[view] = simulate_run(workloads[trace][view], policy, costs, kv_tokens, slo)
        if flat_costs is not None:
            diag = simulate_run(workloads[trace]["engine blocks"], policy, flat_costs, kv_tokens, slo)
            row["diagnostic_context_free_decode"] = {k: diag[k] for k in ("p50_ttft_ms", "mean_tpot_ms")}
        rows.append(row)
    text = table(rows)
    meta = {"kv_capacity_tokens_per_group": kv_tokens, "args": vars(args), "profile": str(args.profile),
            "requests": {t: len(w["trace ids"]) for t, w in workloads.items()}}
    Path(f"{args.out}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    Path(f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
