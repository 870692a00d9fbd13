"""Replay the Azure conversation trace against our router and against plain vLLM, same requests.

    .venv/bin/python -m benchmarks.loadtest_replay                  # both, one after the other
    .venv/bin/python -m benchmarks.loadtest_replay --targets vllm   # only plain vLLM

Each target is started (tiny model, CPU), measured with the load-test harness,
and stopped before the next one starts, so the two never share the CPU. The
same request list (arrival times, lengths, token-id prompts) goes to both.
Writes per target benchmarks/results/loadtest_replay_<target>.{json,_latency_cdf.png,_timeline.png}
and the comparison benchmarks/results/loadtest_replay.{json,md}.

The equivalent CLI, with servers you started yourself:

    python -m loadtest compare --endpoint-a http://127.0.0.1:8000 --label-a router \\
        --endpoint-b http://127.0.0.1:8100 --label-b vllm --tokenizer MODEL_DIR \\
        --trace azure-conv --rate-scale 1 --max-requests 120 --duration 40 \\
        --max-input-tokens 768 --max-output-tokens 64 --slo-ttft-ms 1000 --slo-tpot-ms 100
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.loadtest_servers import router_server, tiny_model_dir, vllm_server
from common.traces import load_trace
from loadtest.metrics import SLO
from loadtest.plots import plot_result
from loadtest.prompts import PromptBuilder, load_tokenizer
from loadtest.report import build_result, compare_ratios, compare_table, summary_table, write_result
from loadtest.runner import RunConfig, build_prompts, run
from loadtest.workload import WorkloadConfig, build_workload

RESULTS = Path(__file__).resolve().parent / "results"
# Each target: the router's extra arguments (None: plain vLLM).
TARGETS = {"router": (), "router-hexserve": ("--api", "hexserve"), "vllm": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="router,vllm",
                    help="router (vLLM's OpenAI layer over the cluster, the default), router-hexserve (the "
                         "router's own layer), vllm (one colocated vllm serve); two give a comparison table")
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--max-requests", type=int, default=120)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--max-input-tokens", type=int, default=768)
    ap.add_argument("--max-output-tokens", type=int, default=64)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--out", default=str(RESULTS / "loadtest_replay"))
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",")]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"--targets: unknown {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    tokenizer = load_tokenizer(tiny_model_dir())
    wcfg = WorkloadConfig(arrival="trace", rate_scale=args.rate_scale, max_requests=args.max_requests,
                          duration_s=args.duration, max_input_tokens=args.max_input_tokens,
                          max_output_tokens=args.max_output_tokens)
    workload = build_workload(wcfg, load_trace(args.trace))
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    results = {}
    for i, target in enumerate(targets):
        server = vllm_server(port=8100) if target == "vllm" else router_server(port=8300, extra_args=TARGETS[target])
        # The same lengths and arrivals for both; fresh token ids per target so that
        # neither sees the other's prompts (they are separate servers anyway).
        prompts = build_prompts(PromptBuilder(tokenizer, "ids", seed=4242 + i), workload)
        load_before = os.getloadavg()[0]
        try:
            with server as (url, model):
                out = run(RunConfig(url, model=model, duration_s=args.duration, drain_s=60, progress=True),
                          workload, prompts)
        except RuntimeError as e:
            print(f"{target}: could not start or measure ({e})")
            continue
        meta = {"label": target, "endpoint": out.endpoint, "model_id": out.model, "trace": args.trace,
                "rate_scale": args.rate_scale, "not_sent": out.not_sent,
                "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
        res = build_result(out.records, slo, meta)
        write_result(res, f"{args.out}_{target}")
        print(f"== {target} ==\n{summary_table(res)}")
        results[target] = res

    doc = {"workload": {"trace": args.trace, "rate_scale": args.rate_scale, "requests": len(workload),
                        "max_input_tokens": args.max_input_tokens, "max_output_tokens": args.max_output_tokens},
           "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}}
    lines = [f"Azure conv trace, {len(workload)} requests at rate scale {args.rate_scale} (input <= "
             f"{args.max_input_tokens}, output <= {args.max_output_tokens} tokens), tiny model on CPU.", ""]
    if len(results) == 2:
        a, b = list(results)
        table = compare_table(results[a], results[b], a, b)
        doc["ratios_b_over_a"] = {"a": a, "b": b, **compare_ratios(results[a], results[b])}
        lines.append(table)
    else:
        for name, res in results.items():
            lines += [f"**{name}**", "", summary_table(res), ""]
    for name, res in results.items():
        doc[name] = {k: v for k, v in res.items() if not isinstance(v, list) and k != "timeline"}
        lines.append(f"\n{name}: machine load average {res['loadavg_1m_before']:.1f} before, "
                     f"{res['loadavg_1m_after']:.1f} after (2 cores, shared).")
    if results:
        plot_result(results, args.out)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1, default=str))
    print("\n".join(lines))
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
