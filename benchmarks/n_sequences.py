"""`n` > 1 on the disaggregated cluster: what one request for n samples costs.

The router runs a request with `n` sequences as n requests on the cluster
(router.engine_client, seeded seed + i as vLLM's parent request), each its
own prefill -> KV -> decode; the prefill engines' prefix cache is what can
spare the repeated prompt. Side by side on the embedded cluster (real vLLM
CPU engines, one prefill and one decode worker), for a fresh prompt each trial:

- n1: one request, n = 1 (the unit);
- n4: one request, n = 4;
- 4 x n1: four requests with the same prompt at once (what a client without n does);
- 4 x n1 after: the same four, sent after one request has cached the prompt.

Reported: wall time per trial, and the prompt tokens the engines computed
against those served from their prefix cache (the router's
hexserve_prompt_{computed,cached}_tokens, differenced per trial).

    python -m benchmarks.n_sequences [--trials 4] [--prompt-words 120] [--max-tokens 32]

Writes benchmarks/results/n_sequences.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import time
from pathlib import Path

import httpx

from benchmarks.loadtest_servers import router_server
from benchmarks.results_files import write_results
from common.ports import free_tcp_port

WORDS = ("river stone cloud lantern orchard copper meadow signal harbor falcon ember quartz willow "
         "canyon thunder velvet glacier compass saffron beacon").split()


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _prompt_counters(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    computed = re.search(r"^hexserve_prompt_computed_tokens ([\d.e+]+)", text, re.M)
    cached = re.search(r"^hexserve_prompt_cached_tokens ([\d.e+]+)", text, re.M)
    return float(computed.group(1)), float(cached.group(1))


async def _complete(client: httpx.AsyncClient, model: str, prompt: str, n: int, seed: int, max_tokens: int) -> int:
    response = await client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "n": n, "seed": seed, "temperature": 1.0, "max_tokens": max_tokens,
        "ignore_eos": True})
    if response.status_code != 200:
        raise RuntimeError(f"the router answered {response.status_code}: {response.text}")
    return sum(1 for _ in response.json()["choices"])


async def _arm(url: str, model: str, arm: str, prompt: str, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        if arm == "4 x n1 after":
            await _complete(client, model, prompt, 1, 99, max_tokens)  # caches the prompt; not timed
        await asyncio.sleep(1.5)  # workers report their prefix-cache counters about once a second
        before = _prompt_counters(url)
        started = time.perf_counter()
        if arm == "n1":
            sequences = await _complete(client, model, prompt, 1, 1, max_tokens)
        elif arm == "n4":
            sequences = await _complete(client, model, prompt, 4, 1, max_tokens)
        else:
            sequences = sum(await asyncio.gather(*(_complete(client, model, prompt, 1, 1 + i, max_tokens)
                                                   for i in range(4))))
        wall_s = time.perf_counter() - started
        await asyncio.sleep(1.5)
        after = _prompt_counters(url)
    return {"arm": arm, "sequences": sequences, "wall_s": wall_s,
            "prompt_computed": after[0] - before[0], "prompt_cached": after[1] - before[1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    for name in ("trials", "prompt_words", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    rng = random.Random(0)
    arms = ("n1", "n4", "4 x n1", "4 x n1 after")
    port = free_tcp_port()
    rows = []
    with router_server(port=port, log=Path("/tmp/hexserve_bench_n_sequences.log")) as (url, model):
        for trial in range(args.trials):
            for arm in arms:
                row = asyncio.run(_arm(url, model, arm, _prompt(rng, args.prompt_words), args.max_tokens))
                rows.append(dict(row, trial=trial))
                print(row, flush=True)
    _write(rows, arms, args)


def _write(rows: list[dict], arms: tuple[str, ...], args) -> None:
    summary = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        summary.append({"arm": arm, "sequences": mine[0]["sequences"],
                        "wall_s_median": statistics.median(r["wall_s"] for r in mine),
                        "prompt_computed_median": statistics.median(r["prompt_computed"] for r in mine),
                        "prompt_cached_median": statistics.median(r["prompt_cached"] for r in mine)})
    unit = summary[0]["wall_s_median"]
    write_results("n_sequences", {"settings": vars(args), "rows": rows, "summary": summary},
                  ["arm", "sequences", "wall s (median)", "× n1", "prompt tokens computed", "prompt tokens from cache"],
                  [[s["arm"], str(s["sequences"]), f"{s['wall_s_median']:.2f}", f"{s['wall_s_median'] / unit:.2f}",
                    f"{s['prompt_computed_median']:.0f}", f"{s['prompt_cached_median']:.0f}"] for s in summary])

if __name__ == "__main__":
    main()
