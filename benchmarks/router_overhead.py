"""Router overhead: latency the router adds per request, and requests/s it sustains.

Stand-in workers (engine.standin, answering instantly) replace vLLM so that
what is measured is the router: HTTP parsing, validation, tokenization, route
choice, the prefill→decode handoff over the control protocol, SSE/JSON.

Side by side, in one run, against the same stand-in workers:
- direct: a client that calls the prefill then the decode worker itself over
  the control protocol (what the router does, minus HTTP and tokenization);
- router: the same requests through `POST /v1/completions`, served by the
  router's own OpenAI layer (api hexserve) or by vLLM's over the cluster
  (api vllm, `router serve --api vllm`: router.engine_client).

    python -m benchmarks.router_overhead [--requests 400] [--concurrency 32] [--apis hexserve,vllm]

Writes benchmarks/results/router_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import zmq.asyncio

from benchmarks.loadtest_servers import wait_ready
from benchmarks.results_files import write_results
from common.roles import Role
from vllm.sampling_params import SamplingParams
from engine import control_protocol as proto
from common.ports import free_tcp_port
from router.launch_local import local_endpoint
from engine.worker_spec import WorkerSpec
from router.serve import API_LAYERS
from router.worker_client import WorkerClient

MAX_TOKENS = 16


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _serve_router(prefill_ep: str, decode_ep: str, decode_kv: str, port: int, routing: str, api: str) -> None:
    """Child process: the router app (`api`: its own OpenAI layer or vLLM's) in front of the stand-in workers."""
    import uvicorn

    from engine.tiny_model import TINY_MODEL_NAME, build_tiny_model
    from router.app import create_app
    from router.prepare import RouterSettings
    from router.cluster import Cluster
    from common.routing import Route
    from common.aio import run_event_loop
    from router.serve import load_tokenizer

    async def main():
        cluster = Cluster(workers=[WorkerSpec("p", Role.PREFILL, prefill_ep), WorkerSpec("d", Role.DECODE, decode_ep, decode_kv)],
                          routes=[Route("p", "d", 1.0)], kv_connector="none", routing=routing)
        await cluster.start()
        await cluster.wait_ready(300)
        app = create_app(cluster, RouterSettings(TINY_MODEL_NAME, 1024), load_tokenizer(str(build_tiny_model())))
        if api == "vllm":
            from router.vllm_api import VllmFrontend

            app = await VllmFrontend.prepare(str(build_tiny_model()), TINY_MODEL_NAME, 1024).app(app)
        await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).serve()

    run_event_loop(main())


async def _direct(prefill_ep: str, decode_ep: str, n: int, concurrency: int) -> tuple[list[float], float]:
    ctx = zmq.asyncio.Context()
    prefill = WorkerClient(WorkerSpec("p", Role.PREFILL, prefill_ep), ctx)
    decode = WorkerClient(WorkerSpec("d", Role.DECODE, decode_ep), ctx)
    prefill.start(), decode.start()
    await prefill.wait_healthy(300), await decode.wait_healthy(300)
    prompt = list(range(5, 40))
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        async for out in prefill.generate(f"p{i}", prompt, SamplingParams(max_tokens=1)):
            handoff = out.kv_transfer_params
        count = 0
        async for out in decode.generate(f"d{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS), handoff):
            count += len(out.token_ids)
        assert count == MAX_TOKENS
        latencies.append(time.perf_counter() - started)

    wall = await _run(one, n, concurrency)
    await prefill.close(), await decode.close()
    ctx.term()
    return latencies, wall


async def _via_router(port: int, n: int, concurrency: int) -> tuple[list[float], float]:
    from engine.tiny_model import TINY_MODEL_NAME

    latencies: list[float] = []
    body = {"model": TINY_MODEL_NAME, "prompt": "The quick brown fox jumps over the lazy dog.", "max_tokens": MAX_TOKENS}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(_i: int) -> None:
            started = time.perf_counter()
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
            latencies.append(time.perf_counter() - started)

        wall = await _run(one, n, concurrency)
    return latencies, wall


async def _run(one, n: int, concurrency: int) -> float:
    queue = list(range(n))
    started = time.perf_counter()

    async def worker():
        while queue:
            await one(queue.pop())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--routings", default="cache-aware,plan",
                        help="routing policies to measure, one router each (cache-aware hashes every prompt's blocks)")
    parser.add_argument("--apis", default="hexserve,vllm",
                        help="OpenAI layers to measure: the router's own (hexserve) and vLLM's over the cluster (vllm)")
    parser.add_argument("--serve-router", nargs=6, metavar=("PREFILL", "DECODE", "DECODE_KV", "PORT", "ROUTING", "API"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_router:
        p, d, kv, port, routing, api = args.serve_router
        _serve_router(p, d, kv, int(port), routing, api)
        return
    for api in args.apis.split(","):
        if api not in API_LAYERS:
            parser.error(f"--apis: unknown layer {api!r}; choose from {', '.join(API_LAYERS)}")
    rows = [row for api in args.apis.split(",") for routing in args.routings.split(",")
            for row in _measure_routing(routing, api, args)]
    _write(rows)


def _measure_routing(routing: str, api: str, args) -> list[dict]:

    prefill_ep, decode_ep, decode_kv, port = local_endpoint(), local_endpoint(), local_endpoint(), free_tcp_port()
    env = dict(os.environ, HEXSERVE_LOG_LEVEL="WARNING")
    procs = [
        subprocess.Popen([sys.executable, "-m", "engine.standin", "--role", Role.PREFILL.value, "--control-endpoint", prefill_ep], env=env),
        subprocess.Popen([sys.executable, "-m", "engine.standin", "--role", Role.DECODE.value, "--control-endpoint", decode_ep], env=env),
        subprocess.Popen([sys.executable, "-m", "benchmarks.router_overhead", "--serve-router", prefill_ep, decode_ep,
                          decode_kv, str(port), routing, api], env=env),
    ]
    try:
        # The router's stdout is this process's; its own log is what to read if it dies.
        wait_ready(f"http://127.0.0.1:{port}", procs[2], timeout_s=400, log=Path("the output above"))
        rows = []
        for mode, concurrency, n in (("sequential", 1, max(50, args.requests // 4)),
                                     ("concurrent", args.concurrency, args.requests)):
            asyncio.run(_via_router(port, 4 * concurrency, concurrency))  # warm up connections and the tokenizer
            direct, direct_wall = asyncio.run(_direct(prefill_ep, decode_ep, n, concurrency))
            routed, routed_wall = asyncio.run(_via_router(port, n, concurrency))
            rows.append({
                "api": api, "routing": routing, "mode": mode, "concurrency": concurrency, "requests": n, "max_tokens": MAX_TOKENS,
                "direct_p50_ms": 1000 * statistics.median(direct), "direct_p99_ms": 1000 * _percentile(direct, 99),
                "router_p50_ms": 1000 * statistics.median(routed), "router_p99_ms": 1000 * _percentile(routed, 99),
                "added_p50_ms": 1000 * (statistics.median(routed) - statistics.median(direct)),
                "added_p99_ms": 1000 * (_percentile(routed, 99) - _percentile(direct, 99)),
                "direct_rps": n / direct_wall, "router_rps": n / routed_wall,
                "router_over_direct_rps": (n / routed_wall) / (n / direct_wall),
            })
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    return rows


def _write(rows: list[dict]) -> None:
    write_results("router_overhead", {"rows": rows, "machine_cores": os.cpu_count()},
                  ["api", "routing", "mode", "conc.", "direct p50 / p99 ms", "router p50 / p99 ms",
                   "added p50 / p99 ms", "direct req/s", "router req/s", "ratio"],
                  [[r["api"], r["routing"], r["mode"], str(r["concurrency"]),
                    f"{r['direct_p50_ms']:.2f} / {r['direct_p99_ms']:.2f}",
                    f"{r['router_p50_ms']:.2f} / {r['router_p99_ms']:.2f}",
                    f"{r['added_p50_ms']:.2f} / {r['added_p99_ms']:.2f}",
                    f"{r['direct_rps']:.0f}", f"{r['router_rps']:.0f}", f"{r['router_over_direct_rps']:.2f}"]
                   for r in rows])

if __name__ == "__main__":
    main()
