"""Helpers for the kvtransfer engine tests: three real vLLM engines and fake peers.

One prefill engine (producer) and one decode engine (consumer) are built once
per test module; the colocated reference is the session-wide one. All share
every setting but the KV role, so their greedy outputs must agree token for token.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import kvtransfer
from kvtransfer.handoff import DecodeHandoff, prefill_params, prompt_hash

# vLLM's CPU default. The colocated reference is the session-wide `reference_llm`
# (tests/conftest.py), built with default settings, so P and D use them too.
BLOCK_SIZE = 128
DECODE_TOKENS = 12
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_block_shape() -> tuple[int, ...]:
    """One block of one layer in vLLM's CPU cache: [kv_heads, block_size, 2 * head_size]."""
    from engine.tiny_model import TinyModelSpec

    spec = TinyModelSpec()
    head_size = spec.hidden_size // spec.num_attention_heads
    return (spec.num_key_value_heads, BLOCK_SIZE, 2 * head_size)


def num_kv_layers() -> int:
    from engine.tiny_model import TinyModelSpec

    return TinyModelSpec().num_layers


@dataclass
class Cluster:
    prefill: Any
    decode: Any
    reference: Any
    prefill_config: dict
    decode_config: dict
    decode_endpoint: str

    def prefill_stats(self) -> dict:
        return kvtransfer.read_stats(kvtransfer.stats_path(self.prefill_config))

    def decode_stats(self) -> dict:
        return kvtransfer.read_stats(kvtransfer.stats_path(self.decode_config))


def build_cluster(workdir: str, reference) -> Cluster:
    from vllm import LLM

    from engine.config import tiny_model_settings

    endpoint = f"ipc://{workdir}/decode.sock"
    prefill_config = kvtransfer.connector_config(
        "producer",
        stats_path=f"{workdir}/prefill.json",
        ack_timeout_s=3,
        send_timeout_ms=2000,
        # One block per chunk: every multi-block prompt exercises the split of a
        # layer into several chunks, as an 8k-token prompt of a big model does.
        max_chunk_bytes=1,
    )
    decode_config = kvtransfer.connector_config(
        "consumer",
        listen_endpoint=endpoint,
        stats_path=f"{workdir}/decode.json",
        load_timeout_s=4,
        transfer_timeout_s=3,
        lease_s=8,
    )
    tiny_model_settings().apply_process_env()
    engines = [LLM(**tiny_model_settings(kv_transfer_config=c).engine_kwargs()) for c in (prefill_config, decode_config)]
    return Cluster(*engines, reference, prefill_config, decode_config, endpoint)


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(length)]


def greedy(max_tokens: int = DECODE_TOKENS, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def run_prefill(
    cluster: Cluster, prompts: list[list[int]], *, decode_tp: int = 1, decode_layers: list[int] | None = None,
    skip_blocks: int = 0, **sampling
) -> list[dict | None]:
    """Prefill on P (max_tokens=1) and return each request's kv_transfer_params."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            max_tokens=1,
            temperature=0.0,
            extra_args={"kv_transfer_params": prefill_params(cluster.decode_endpoint, decode_tp=decode_tp,
                                                             decode_layers=decode_layers, skip_blocks=skip_blocks)},
            **sampling,
        )
        for _ in prompts
    ]
    outputs = cluster.prefill.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.kv_transfer_params for o in outputs]


def run_decode(cluster: Cluster, prompts: list[list[int]], handoffs: list[dict | None]) -> list[list[int]]:
    params = [greedy(extra_args={"kv_transfer_params": dict(h)} if h else None) for h in handoffs]
    outputs = cluster.decode.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_reference(cluster: Cluster, prompts: list[list[int]]) -> list[list[int]]:
    outputs = cluster.reference.generate([{"prompt_token_ids": p} for p in prompts], [greedy() for _ in prompts], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def wait_for(predicate, timeout_s: float = 15.0, what: str = "condition"):
    """Poll until predicate() is truthy (counters are published a few times a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def spawn_python(code: str) -> subprocess.Popen:
    """A helper process (a fake peer the fault tests kill); prints a line when ready."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def temp_workdir() -> str:
    return tempfile.mkdtemp(prefix="kvt-test-")


def deltas(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if isinstance(before[k], int) and k not in ("pid",)}


def settled(read) -> dict:
    """Counters once the previous test's updates are published (the worker
    rewrites the file at most every 0.2 s), so deltas count only this test."""
    last = read()
    for _ in range(20):
        time.sleep(0.3)
        current = read()
        if {k: v for k, v in current.items() if k != "time_s"} == {k: v for k, v in last.items() if k != "time_s"}:
            return current
        last = current
    return last


def wait_delta(before: dict, read, key: str, timeout_s: float = 15.0) -> dict:
    """Counter deltas once `key` has moved (the worker publishes a few times a second)."""
    return wait_for(lambda: (d := deltas(before, read()))[key] and d, timeout_s=timeout_s, what=f"{key} to change")


def handoff_for(prompt: list[int], transfer_id: str) -> dict:
    """The kv_transfer_params prefill would have returned for this prompt."""
    return DecodeHandoff(transfer_id, len(prompt), prompt_hash(prompt)).to_params()
