"""`python -m loadtest run|compare ...`: replay a trace or a synthetic load against an endpoint.

Examples (the tokenizer folder is the served model's, read locally):

    python -m loadtest run --endpoint http://127.0.0.1:8000 --tokenizer MODEL_DIR \\
        --trace azure-conv --rate-scale 0.5 --max-requests 50 --duration 120 \\
        --max-input-tokens 256 --max-output-tokens 32 --slo-ttft-ms 2000 --slo-tpot-ms 200 \\
        --out benchmarks/results/loadtest_router

    # Mooncake trace, hash-id blocks scaled from 512 to 16 tokens for a 1024-token model;
    # the report gives the prefix-cache hit rate the engines measured (from /metrics):
    python -m loadtest run --endpoint http://127.0.0.1:8000 --tokenizer MODEL_DIR \\
        --trace mooncake_synthetic.jsonl --block-tokens 16 --max-input-tokens 960 \\
        --max-output-tokens 64 --rate-scale 0.5 --max-requests 200 --duration 120

    python -m loadtest compare --endpoint-a http://127.0.0.1:8000 --endpoint-b http://127.0.0.1:8100 \\
        --tokenizer MODEL_DIR --arrival poisson --rate 2 --input-len 128 --output-len 16 --max-requests 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from common.traces import MOONCAKE_BLOCK_TOKENS, TRACE_FORMATS, TraceError, load_trace
from loadtest.metrics import SLO
from loadtest.plots import plot_result
from loadtest.prefix_cache import PREFIX_COUNTS_SETTLE_S, prefix_cache_report, scrape_prefix_cache
from loadtest.prompts import PROMPT_FORMATS, PromptBuilder, PromptError, load_tokenizer
from loadtest.report import build_result, compare_ratios, compare_table, output_prefix, summary_table, write_result
from loadtest.runner import RunConfig, build_prompts, run
from loadtest.workload import ARRIVALS, WorkloadConfig, build_workload, offered_rate_rps


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--tokenizer", required=True, help="local folder with the served model's tokenizer")
    g.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="ids",
                   help="ids: token-id prompts (exact); text: strings re-tokenized to the exact count")
    g.add_argument("--trace", help="trace file, or azure-conv / azure-code from ../shared/traces")
    g.add_argument("--trace-format", default="auto", choices=("auto", *TRACE_FORMATS))
    g.add_argument("--arrival", choices=ARRIVALS, default=None,
                   help="arrival process (default: trace when --trace is given, else poisson)")
    g.add_argument("--rate", type=float, help="requests/s for poisson and gamma")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    g.add_argument("--concurrency", type=int, help="closed loop with N in flight (or a cap for open loop)")
    g.add_argument("--rate-scale", type=float, default=1.0, help="trace replay speed: 2 = twice as fast")
    g.add_argument("--start-s", type=float, default=0.0, help="skip this many seconds of the trace")
    g.add_argument("--max-requests", type=int, default=100, help="request count bound (default 100)")
    g.add_argument("--duration", type=float, default=300.0, help="stop sending after this many s")
    g.add_argument("--input-len", type=int, help="fixed prompt tokens (overrides the trace)")
    g.add_argument("--output-len", type=int, help="fixed output tokens (overrides the trace)")
    g.add_argument("--max-input-tokens", type=int,
                   help="clip prompts to what the model accepts (cut from the end: shared prefixes stay)")
    g.add_argument("--block-tokens", type=int, default=MOONCAKE_BLOCK_TOKENS,
                   help="tokens per Mooncake hash-id block on the wire (default 512, the trace's own); "
                        "scales input lengths by N/512, rounded up, e.g. 16 for a 1024-token model")
    g.add_argument("--max-output-tokens", type=int, help="clip outputs")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic arrivals")
    g.add_argument("--prompt-seed", type=int, default=None,
                   help="seed of the prompt tokens (default: random per run, so a second run does not "
                        "hit the server's prefix cache; set it to send identical prompts)")
    s = p.add_argument_group("SLOs and output")
    s.add_argument("--slo-ttft-ms", type=float)
    s.add_argument("--slo-tpot-ms", type=float)
    s.add_argument("--slo-e2el-ms", type=float)
    s.add_argument("--drain", type=float, default=60.0, help="s to wait for in-flight after --duration")
    s.add_argument("--request-timeout", type=float, default=120.0)
    s.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    s.add_argument("--out", default="benchmarks/results/loadtest_run", help="output path: PREFIX or PREFIX.json writes PREFIX.json and PREFIX_*.png")
    s.add_argument("--no-plots", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--no-per-request", action="store_true", help="leave per-request lists out of the JSON")


def _prepare(args):
    trace = load_trace(args.trace, args.trace_format) if args.trace else None
    arrival = args.arrival or ("trace" if trace else ("concurrency" if args.concurrency else "poisson"))
    wcfg = WorkloadConfig(
        arrival=arrival, rate_rps=args.rate, burstiness=args.burstiness,
        concurrency=args.concurrency, rate_scale=args.rate_scale, start_s=args.start_s,
        max_requests=args.max_requests, duration_s=args.duration,
        input_len=args.input_len, output_len=args.output_len,
        max_input_tokens=args.max_input_tokens, max_output_tokens=args.max_output_tokens,
        block_tokens=args.block_tokens, seed=args.seed,
    )
    workload = build_workload(wcfg, trace)
    if args.prompt_seed is None:
        args.prompt_seed = random.SystemRandom().randrange(1 << 30)
    builder = PromptBuilder(load_tokenizer(args.tokenizer), args.prompt_format, args.prompt_seed,
                            block_tokens=args.block_tokens)
    prompts = build_prompts(builder, workload)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms)
    meta = {
        "tokenizer_id": args.tokenizer,
        "trace": args.trace,
        "arrival": arrival,
        "request_rate": args.rate if arrival in ("poisson", "gamma") else offered_rate_rps(workload),
        "burstiness": args.burstiness,
        "max_concurrency": args.concurrency,
        "rate_scale": args.rate_scale,
        "prompt_format": args.prompt_format,
        "prompt_seed": args.prompt_seed,
        "block_tokens": args.block_tokens,
        "max_input_tokens": args.max_input_tokens,
        # Clipped prompts lose their last blocks, so their hits are not the trace's.
        "inputs_clipped": sum(r.input_clipped for r in workload),
    }
    return wcfg, workload, prompts, slo, meta


def _run_one(args, endpoint, model, label, workload, prompts, slo, meta) -> dict:
    rcfg = RunConfig(
        endpoint=endpoint, model=model, duration_s=args.duration, drain_s=args.drain,
        request_timeout_s=args.request_timeout, concurrency=args.concurrency,
        extra_body=json.loads(args.extra_body), progress=not args.no_progress,
    )
    cache_before = scrape_prefix_cache(rcfg.endpoint)
    outcome = run(rcfg, workload, prompts)
    if cache_before.source is not None:
        time.sleep(PREFIX_COUNTS_SETTLE_S)  # let the last requests' counts land first
    cache = prefix_cache_report(cache_before, scrape_prefix_cache(rcfg.endpoint))
    meta = {**meta, "label": label, "endpoint": outcome.endpoint, "model_id": outcome.model,
            "not_sent": outcome.not_sent, "wall_s": outcome.wall_s, **cache}
    return build_result(outcome.records, slo, meta, per_request=True)


def cmd_run(args) -> int:
    _, workload, prompts, slo, meta = _prepare(args)
    result = _run_one(args, args.endpoint, args.model, args.label, workload, prompts, slo, meta)
    if args.no_per_request:
        for key in ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "errors"):
            result.pop(key, None)
    paths = write_result(result, args.out, plots=not args.no_plots)
    print(summary_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if result["completed"] > 0 else 1


def cmd_compare(args) -> int:
    _, workload, prompts, slo, meta = _prepare(args)
    res_a = _run_one(args, args.endpoint_a, args.model_a, args.label_a, workload, prompts, slo, meta)
    res_b = _run_one(args, args.endpoint_b, args.model_b, args.label_b, workload, prompts, slo, meta)
    prefix = output_prefix(args.out)
    write_result(res_a, f"{prefix}_{args.label_a}", plots=False)
    write_result(res_b, f"{prefix}_{args.label_b}", plots=False)
    table = compare_table(res_a, res_b, args.label_a, args.label_b)
    summary = {"label_a": args.label_a, "label_b": args.label_b,
               "ratios_b_over_a": compare_ratios(res_a, res_b), "table_md": table}
    Path(f"{prefix}_compare.json").write_text(json.dumps(summary, indent=1))
    Path(f"{prefix}_compare.md").write_text(table + "\n")
    if not args.no_plots:
        plot_result({args.label_a: res_a, args.label_b: res_b}, prefix)
    print(table)
    return 0 if res_a["completed"] and res_b["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="load one endpoint")
    p_run.add_argument("--endpoint", required=True, help="http://host:port[/v1]")
    p_run.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p_run.add_argument("--label", default="run")
    _add_workload_args(p_run)
    p_cmp = sub.add_parser("compare", help="run the same workload against two endpoints, print B/A")
    p_cmp.add_argument("--endpoint-a", required=True)
    p_cmp.add_argument("--endpoint-b", required=True)
    p_cmp.add_argument("--model-a")
    p_cmp.add_argument("--model-b")
    p_cmp.add_argument("--label-a", default="A")
    p_cmp.add_argument("--label-b", default="B")
    _add_workload_args(p_cmp)
    args = parser.parse_args(argv)
    try:
        return cmd_run(args) if args.cmd == "run" else cmd_compare(args)
    except (TraceError, PromptError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
