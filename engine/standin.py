"""A stand-in engine: answers instantly, so a benchmark measures the router, not vLLM.

It is never used to prove the serving path (the tests run real vLLM engines);
it exists so `benchmarks/router_overhead.py` can tell how much latency and
CPU the router itself adds per request. Tokens are a deterministic function
of the prompt, so a benchmark can still check answers arrive intact.

Run one: `python -m engine.standin --role decode --control-endpoint tcp://127.0.0.1:7002`.
"""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

from common.roles import Role
from engine.config import EngineSettings
from engine.worker_server import WorkerServer, run_worker


class StandInEngine:
    """The slice of AsyncLLM's interface the worker uses: generate, abort, shutdown."""

    def __init__(self, token_delay_s: float = 0.0):
        self.token_delay_s = token_delay_s

    async def generate(self, prompt: dict, sampling, request_id: str):
        prompt_ids = prompt["prompt_token_ids"]
        for i in range(sampling.max_tokens):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            else:
                await asyncio.sleep(0)
            token = (sum(prompt_ids) + i) % 500 + 10
            last = i == sampling.max_tokens - 1
            yield SimpleNamespace(
                outputs=[SimpleNamespace(token_ids=[token], text=f" t{token}", finish_reason="length" if last else None,
                                         logprobs=None, stop_reason=None)],
                finished=last, num_cached_tokens=0, prompt_logprobs=None,
                kv_transfer_params={"do_remote_prefill": True, "standin": True} if last else None)

    async def abort(self, request_id: str) -> None:
        return None

    def shutdown(self) -> None:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A stand-in worker for router benchmarks.")
    parser.add_argument("--role", choices=[role.value for role in Role], required=True)
    parser.add_argument("--control-endpoint", required=True)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    server = WorkerServer(
        settings=EngineSettings(model="standin"), role=args.role, worker_id=args.worker_id or f"standin-{args.role}",
        control_endpoint=args.control_endpoint, engine_factory=lambda: StandInEngine(args.token_delay_s))
    run_worker(server, exit_with_parent=True)


if __name__ == "__main__":
    main()
