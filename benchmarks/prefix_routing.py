"""Cache-aware routing measured on real engines: plan vs round-robin vs cache-aware.

Two prefill workers and one decode worker of the tiny model on this machine
(benchmarks.local_plans, KV-cache blocks of 32 tokens, the smallest the CPU
backend takes), one router per run, started fresh (cold caches) and stopped
before the next, so runs never share the CPU. Each run replays the same
requests (same arrival times, lengths and token-id prompts: --prompt-seed is
fixed) with the load-test harness:

- Mooncake's synthetic trace, its 512-token hash blocks scaled to 32 tokens
  (`--block-tokens 32`: equal hash ids are equal 32-token prefixes), prompts
  clipped at 960 tokens from the end, from --start-s on (where the trace
  reuses more), under plan, round-robin and cache-aware routing;
- the Azure conversation trace (no shared prefixes), plan vs cache-aware, to
  show what cache awareness costs where there is nothing to reuse;
- cache-aware with decode-first off (`mooncake:cache-aware:0`), to measure
  what decode-first adds.

Prompt tokens computed and cached are the engines' own counts, read from the
router's /metrics before and after each run: `hexserve_prompt_computed_tokens`
covers every place a prompt was computed (prefill workers, and the decode
worker for decode-first requests); the load test's `prefill_tokens_computed`
covers the prefill workers only.

    .venv/bin/python -m benchmarks.prefix_routing [--requests 300] [--rate-scale 0.5] [--start-s 900]
    .venv/bin/python -m benchmarks.prefix_routing --prefill-workers 4 --name prefix_routing_4p \
        --runs mooncake:plan,mooncake:cache-aware

Writes benchmarks/results/prefix_routing.{json,md} and each run's load-test
result as benchmarks/results/prefix_routing_<trace>_<policy>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.loadtest_servers import REPO, router_server, tiny_model_dir
from benchmarks.local_plans import write_local_plan

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_TOKENS = 32
PORT = 8131
# (trace, policy, decode-first max tokens for cache-aware: None = the router's default)
RUNS = (("mooncake", "plan", None), ("mooncake", "round-robin", None), ("mooncake", "cache-aware", None),
        ("mooncake", "cache-aware", 0), ("azure-conv", "plan", None), ("azure-conv", "cache-aware", None))
COLUMNS = (("prompt_tokens_computed", "prompt tokens computed"), ("prompt_cache_hit_rate", "engine hit rate"),
           ("decode_first_requests", "decode-first"), ("completed", "completed"), ("failed", "failed"),
           ("p50_ttft_ms", "TTFT p50 ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("mean_tpot_ms", "TPOT mean ms"),
           ("request_throughput", "req/s"), ("request_goodput", "goodput req/s"))


def _router_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    names = {"hexserve_prompt_computed_tokens": "computed", "hexserve_prompt_cached_tokens": "cached",
             "hexserve_decode_first_requests": "decode_first"}
    return {key: float(re.search(rf"^{name} ([\d.e+-]+)$", text, re.M).group(1)) for name, key in names.items()}


def _trace_args(trace: str, args) -> list[str]:
    common = ["--max-input-tokens", "960", "--max-output-tokens", str(args.output_tokens),
              "--max-requests", str(args.requests), "--rate-scale", str(args.rate_scale), "--prompt-seed", "0"]
    if trace == "mooncake":
        return ["--trace", "mooncake_synthetic.jsonl", "--block-tokens", str(BLOCK_TOKENS),
                "--start-s", str(args.start_s), *common]
    return ["--trace", trace, *common]


def _run_key(trace: str, policy: str, decode_first: int | None) -> str:
    return f"{trace}_{policy}" + (f"_df{decode_first}" if decode_first is not None else "")


def run_one(trace: str, policy: str, decode_first: int | None, plan: Path, args) -> dict:
    label = _run_key(trace, policy, decode_first)
    out = RESULTS / f"{args.name}_{label}.json"
    router_args = ("--plan", str(plan), "--model", str(tiny_model_dir()), "--block-size", str(BLOCK_TOKENS),
                   "--routing", policy)
    if decode_first is not None:
        router_args += ("--decode-first-max-tokens", str(decode_first))
    with router_server(PORT, Path(tempfile.gettempdir()) / f"hexserve_bench_prefix_{label}.log",
                       extra_args=router_args) as (url, model):
        before = _router_counts(url)
        cmd = [sys.executable, "-m", "loadtest", "run", "--endpoint", url, "--model", model, "--label", label,
               "--tokenizer", str(tiny_model_dir()), "--slo-ttft-ms", str(args.slo_ttft_ms),
               "--slo-tpot-ms", str(args.slo_tpot_ms), "--no-plots", "--no-progress", "--no-per-request",
               "--out", str(out), *_trace_args(trace, args)]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        time.sleep(1.5)  # the engines' last counts reach the router with its next health ping (0.5 s)
        after = _router_counts(url)
    result = json.loads(out.read_text())
    computed, cached = after["computed"] - before["computed"], after["cached"] - before["cached"]
    result.update(trace=trace, policy=policy if decode_first is None else f"{policy} (decode-first {decode_first})",
                  run=label, prompt_tokens_computed=computed, prompt_tokens_cached=cached,
                  prompt_cache_hit_rate=cached / (computed + cached) if computed + cached else None,
                  decode_first_requests=after["decode_first"] - before["decode_first"])
    return result


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def table(results: list[dict]) -> str:
    lines = ["| trace | routing | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append(f"| {r['trace']} | {r['policy']} | " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    by = {(r["trace"], r["policy"]): r for r in results}
    ratios = []
    for trace in ("mooncake", "azure-conv"):
        plan, cache = by.get((trace, "plan")), by.get((trace, "cache-aware"))
        if plan and cache and cache["prompt_tokens_computed"]:
            ratios.append(f"- {trace}: plan computes {plan['prompt_tokens_computed'] / cache['prompt_tokens_computed']:.2f}x "
                          f"the prompt tokens cache-aware does; TTFT p50 cache-aware/plan "
                          f"{cache['p50_ttft_ms'] / plan['p50_ttft_ms']:.2f}; goodput cache-aware/plan "
                          f"{(cache['request_goodput'] or 0) / (plan['request_goodput'] or 1):.2f}")
    return "\n".join(lines + [""] + ratios) + "\n"


def _parse_run(item: str) -> tuple[str, str, int | None]:
    parts = item.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--runs item {item!r}: use trace:policy or trace:policy:decode-first-max-tokens")
    return parts[0], parts[1], int(parts[2]) if len(parts) == 3 else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate-scale", type=float, default=0.5, help="trace replay speed (Mooncake: ~2 req/s at 0.5)")
    ap.add_argument("--start-s", type=float, default=900.0, help="where in the Mooncake trace to start")
    ap.add_argument("--output-tokens", type=int, default=32, help="clip outputs to this many tokens")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=200.0)
    ap.add_argument("--runs", default=None,
                    help="trace:policy[:decode-first max tokens],... to run (default: all of RUNS)")
    ap.add_argument("--prefill-workers", type=int, default=2)
    ap.add_argument("--name", default="prefix_routing", help="results file name (benchmarks/results/NAME.{json,md})")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other runs already in prefix_routing.json (replace only these)")
    args = ap.parse_args(argv)
    runs = RUNS if args.runs is None else [_parse_run(item) for item in args.runs.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plan = write_local_plan(Path(tempfile.mkdtemp(prefix="hexserve-prefix-")), num_prefill=args.prefill_workers,
                            num_decode=1)
    results = [run_one(trace, policy, decode_first, plan, args) for trace, policy, decode_first in runs]
    summary = RESULTS / f"{args.name}.json"
    if args.merge and summary.exists():
        fresh = {r["run"] for r in results}
        kept = [r for r in json.loads(summary.read_text())["runs"]
                if r.setdefault("run", f"{r['trace']}_{r['policy']}") not in fresh]
        order = [_run_key(*run) for run in RUNS]
        results = sorted(kept + results, key=lambda r: order.index(r["run"]) if r.get("run") in order else len(order))
    meta = {"setup": f"{args.prefill_workers} prefill + 1 decode workers, tiny model, CPU (2 cores), "
                     f"KV blocks of {BLOCK_TOKENS} tokens", "args": vars(args)}
    summary.write_text(json.dumps({**meta, "runs": results}, indent=1, default=str))
    text = table(results)
    summary.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
