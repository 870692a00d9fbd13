"""End to end on CPU: time from "prefill finished" to "first decoded token".

For each prompt length, a request is prefilled (max_tokens=1) and then
submitted for decode with the prefill's kv_transfer_params; the time of that
second call (until its first token is out) is the handoff latency: waiting
for / loading the KV plus one forward pass. Compared in the same run:

- kvtransfer: HexKVConnector, prefill engine -> ZeroMQ -> decode engine
  (KV that arrived before the decode request loads in the step admitting it);
- kvtransfer, async only: a second decode engine with sync_load=False, which
  always takes vLLM's asynchronous load path (request parked, loaded, then
  scheduled a step later), as vLLM's own NIXL connector does;
- ExampleConnector: vLLM's in-tree connector (safetensors files on disk),
  one kv_both engine, prefix caching off so decode loads what prefill saved;
- recompute: the decode engine given no KV (it prefills the prompt itself).

It also measures the accuracy cost of int8 payload compression: a second
prefill engine sends int8 KV to the same decode engine, and the greedy tokens
are compared with the exact (raw) path.

    .venv/bin/python -m benchmarks.kvtransfer_e2e            # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(length)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accuracy-prompts", type=int, default=24)
    parser.add_argument("--accuracy-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams

    import kvtransfer
    from engine.config import tiny_model_settings

    workdir = tempfile.mkdtemp(prefix="kvt-e2e-")
    endpoint = f"ipc://{workdir}/decode.sock"
    endpoint_async = f"ipc://{workdir}/decode-async.sock"
    tiny_model_settings().apply_process_env()
    cfg_p = kvtransfer.connector_config("producer", stats_path=f"{workdir}/p.json")
    cfg_p8 = kvtransfer.connector_config("producer", stats_path=f"{workdir}/p8.json", encoding="int8")
    cfg_d = kvtransfer.connector_config("consumer", listen_endpoint=endpoint, stats_path=f"{workdir}/d.json")
    cfg_da = kvtransfer.connector_config("consumer", listen_endpoint=endpoint_async, stats_path=f"{workdir}/da.json", sync_load=False)
    cfg_ex = {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": f"{workdir}/example"},
    }
    started = time.perf_counter()
    prefill = LLM(**tiny_model_settings(kv_transfer_config=cfg_p).engine_kwargs())
    decode = LLM(**tiny_model_settings(kv_transfer_config=cfg_d).engine_kwargs())
    decode_async = LLM(**tiny_model_settings(kv_transfer_config=cfg_da).engine_kwargs())
    example = LLM(**tiny_model_settings(kv_transfer_config=cfg_ex, enable_prefix_caching=False).engine_kwargs())
    print(f"engines up in {time.perf_counter() - started:.0f} s", flush=True)

    def first_token(p, extra=None, engine=None):
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, extra_args=extra)
        return (engine or decode).generate([{"prompt_token_ids": p}], [params], use_tqdm=False)[0]

    def prefill_then_time(pre_engine, post_engine, prompt, extra_fn):
        out = first_token(prompt, extra_fn(), engine=pre_engine)
        handoff = out.kv_transfer_params
        start = time.perf_counter()
        first_token(prompt, {"kv_transfer_params": handoff} if handoff else None, engine=post_engine)
        return time.perf_counter() - start

    rows = []
    seed = 0
    for length in args.lengths:
        times = {"kvtransfer": [], "kvtransfer_async": [], "example_connector": [], "recompute": []}
        sync_before = kvtransfer.read_stats(kvtransfer.stats_path(cfg_d))["transfers_loaded_sync"]
        for rep in range(args.repeats + 1):  # the first round warms up
            seed += 1
            p = _prompt(length, seed)
            t_ours = prefill_then_time(prefill, decode, p, lambda: {"kv_transfer_params": kvtransfer.prefill_params(endpoint)})
            seed += 1
            p = _prompt(length, seed)
            t_async = prefill_then_time(
                prefill, decode_async, p, lambda: {"kv_transfer_params": kvtransfer.prefill_params(endpoint_async)}
            )
            seed += 1
            p = _prompt(length, seed)
            t_ex = prefill_then_time(example, example, p, lambda: None)
            seed += 1
            p = _prompt(length, seed)
            start = time.perf_counter()
            first_token(p)
            t_re = time.perf_counter() - start
            if rep:
                times["kvtransfer"].append(t_ours)
                times["kvtransfer_async"].append(t_async)
                times["example_connector"].append(t_ex)
                times["recompute"].append(t_re)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        time.sleep(0.5)  # the worker publishes its counters a few times a second
        sync_loads = kvtransfer.read_stats(kvtransfer.stats_path(cfg_d))["transfers_loaded_sync"] - sync_before
        rows.append({"prompt_tokens": length, **{f"{k}_ms": v for k, v in med.items()}, "sync_loads": sync_loads,
                     "requests": args.repeats + 1, "samples_s": times})
        print(
            f"{length:5d} tokens: kvtransfer {med['kvtransfer']:.1f} ms ({sync_loads}/{args.repeats + 1} loaded in the admitting step)  "
            f"async only {med['kvtransfer_async']:.1f} ms  ExampleConnector {med['example_connector']:.1f} ms "
            f"({med['example_connector'] / med['kvtransfer']:.2f}x ours)  recompute {med['recompute']:.1f} ms",
            flush=True,
        )
    stats_d = kvtransfer.read_stats(kvtransfer.stats_path(cfg_d))

    # Accuracy cost of int8 compression: same prompts through raw and int8 prefill engines.
    example.llm_engine.engine_core.shutdown()
    prefill8 = LLM(**tiny_model_settings(kv_transfer_config=cfg_p8).engine_kwargs())
    prompts = [_prompt(random.Random(i).randrange(20, 900), 10_000 + i) for i in range(args.accuracy_prompts)]
    greedy = lambda extra: SamplingParams(max_tokens=args.accuracy_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)  # noqa: E731

    def through(pre):
        pre_params = [SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": kvtransfer.prefill_params(endpoint)}) for _ in prompts]
        handoffs = [o.kv_transfer_params for o in pre.generate([{"prompt_token_ids": p} for p in prompts], pre_params, use_tqdm=False)]
        outs = decode.generate([{"prompt_token_ids": p} for p in prompts], [greedy({"kv_transfer_params": h}) for h in handoffs], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    before = kvtransfer.read_stats(kvtransfer.stats_path(cfg_d))
    exact = through(prefill)
    lossy = through(prefill8)
    after = kvtransfer.read_stats(kvtransfer.stats_path(cfg_d))
    same_prompts = sum(a == b for a, b in zip(exact, lossy))
    same_tokens = sum(x == y for a, b in zip(exact, lossy) for x, y in zip(a, b))
    first_diverge = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(exact, lossy)]
    accuracy = {
        "prompts": len(prompts),
        "tokens_per_prompt": args.accuracy_tokens,
        "identical_outputs": same_prompts,
        "identical_token_positions": same_tokens,
        "total_token_positions": len(prompts) * args.accuracy_tokens,
        "mean_first_divergence": statistics.mean(first_diverge),
        "loads_ok": after["transfers_loaded_ok"] - before["transfers_loaded_ok"],
        "loads_failed": after["transfers_loaded_failed"] - before["transfers_loaded_failed"],
    }
    print(f"int8: {same_prompts}/{len(prompts)} outputs identical to raw; mean first divergence at token {accuracy['mean_first_divergence']:.1f}", flush=True)

    command = "python -m benchmarks.kvtransfer_e2e " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command.strip(),
        "machine": f"{os.cpu_count()} CPUs",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_average_1m_at_end": os.getloadavg()[0],
        "decode_stats": stats_d,
    }
    (RESULTS / "kvtransfer_e2e.json").write_text(json.dumps({"meta": meta, "rows": rows, "int8_accuracy": accuracy}, indent=2))
    lines = [
        f"Prefill finished -> first decoded token, tiny model on CPU ({meta['machine']}, {meta['date_utc']} UTC, "
        f"1-min load average {meta['load_average_1m_at_end']:.1f}), median of {args.repeats}.",
        f"Command: `{meta['command']}`",
        "",
        "| prompt tokens | kvtransfer ms | loaded in the admitting step | kvtransfer, async load only ms | "
        "ExampleConnector ms | ExampleConnector / kvtransfer | async only / kvtransfer | recompute on decode ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt_tokens']} | {r['kvtransfer_ms']:.1f} | {r['sync_loads']}/{r['requests']} | {r['kvtransfer_async_ms']:.1f} | "
            f"{r['example_connector_ms']:.1f} | {r['example_connector_ms'] / r['kvtransfer_ms']:.2f}x | "
            f"{r['kvtransfer_async_ms'] / r['kvtransfer_ms']:.2f}x | {r['recompute_ms']:.1f} |"
        )
    lines += [
        "",
        f"int8 payload compression (4x fewer bytes than float32): {same_prompts}/{len(prompts)} greedy outputs of "
        f"{args.accuracy_tokens} tokens identical to the exact path; {same_tokens}/{accuracy['total_token_positions']} "
        f"token positions equal; mean first divergence at token {accuracy['mean_first_divergence']:.1f}.",
    ]
    (RESULTS / "kvtransfer_e2e.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'kvtransfer_e2e.md'}")
    for engine in (prefill, prefill8, decode, decode_async):
        engine.llm_engine.engine_core.shutdown()
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
