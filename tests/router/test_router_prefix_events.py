"""The router's prefix index against a real vLLM engine's KV-cache events.

One colocated worker runs in this process with a deliberately small KV cache
(12 blocks) so that new prompts evict old ones: the index must hold exactly
the blocks the engine stores (the router's block hashes equal the engine's),
drop them when the engine evicts them, and forget a worker that dies.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from common.block_hash import block_keys
from common.roles import Role
from common.routing import Route
from vllm.sampling_params import SamplingParams
from engine import control_protocol as proto
from engine.worker_spec import WorkerSpec

pytestmark = pytest.mark.slow


async def _until(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _complete(cluster, prompt: list[int]) -> list[int]:
    tokens: list[int] = []
    async for _route, output in cluster.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0)):
        assert output.error is None, output.error
        tokens += output.token_ids
    return tokens


def test_index_follows_a_real_engines_stored_and_removed_events_and_forgets_a_dead_worker(tmp_path):
    from engine.config import tiny_model_settings
    from engine.worker_server import WorkerServer
    from router.cluster import Cluster

    rng = random.Random(3)
    spec = WorkerSpec("w0", Role.COLOCATED, f"ipc://{tmp_path}/control.sock",
                      kv_events_endpoint=f"ipc://{tmp_path}/events.sock")
    settings = tiny_model_settings(kv_events_endpoint=spec.kv_events_endpoint,
                                   extra={"num_gpu_blocks_override": 12})

    async def scenario():
        server = WorkerServer(settings=settings, role=Role.COLOCATED, worker_id="w0",
                              control_endpoint=spec.control_endpoint)
        serving = asyncio.ensure_future(server.serve())
        cluster = Cluster(workers=[spec], routes=[Route("w0", "w0", 1.0)], kv_connector="none",
                          health_timeout_s=2.0)
        try:
            await cluster.start()
            await cluster.wait_ready(600)
            index = cluster.prefix_index
            first = [rng.randrange(10, 500) for _ in range(300)]
            await _complete(cluster, first)
            await _until(lambda: index.num_blocks("w0") > 0, what="the first stored event")
            block_size = index.block_size("w0")
            full_blocks = 300 // block_size
            # The router's hashes of the prompt are the engine's: every full block is found.
            assert index.cached_blocks("w0", block_keys(first, block_size)) == full_blocks >= 1
            assert cluster.cached_tokens(first + [7])["w0"] == full_blocks * block_size
            # Other prompts fill the 12-block cache: the engine evicts the first prompt's
            # blocks and says so; the index follows.
            for _ in range(4):
                await _complete(cluster, [rng.randrange(10, 500) for _ in range(700)])
            await _until(lambda: index.cached_blocks("w0", block_keys(first, block_size)) == 0,
                         what="the first prompt's blocks to be removed")
            assert 0 < index.num_blocks("w0") <= 12
            assert cluster.event_stats.resets == {}, cluster.event_stats.resets
            # A worker that dies leaves the index.
            server.stop()
            await serving
            await _until(lambda: not cluster.is_healthy("w0"), what="the worker to leave rotation")
            await _until(lambda: index.num_blocks("w0") == 0, what="the index to forget the worker")
            assert cluster.event_stats.resets == {"worker_unhealthy": 1}
        finally:
            await cluster.close()
            server.stop()
            if not serving.done():
                await serving

    asyncio.run(scenario())
