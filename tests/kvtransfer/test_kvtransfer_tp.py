"""Tensor parallelism: TP=2 -> TP=2, TP=1 -> TP=2 and TP=2 -> TP=1 handoffs.

Each rank moves its own slice of the KV heads on its own socket (prefill rank
r -> decode rank r, kvtransfer.endpoints.rank_endpoint); a TP=1 prefill engine
splits its heads between the two decode ranks; a TP=1 decode engine
assembles its heads from both ranks of a TP=2 prefill engine. The reference
is the decode engine itself running the prompt without kv_transfer_params:
the same layout computing everything locally, so greedy tokens must agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvtransfer
from kvt_engines import (
    BLOCK_SIZE,
    DECODE_TOKENS,
    deltas,
    greedy,
    handoff_for,
    num_kv_layers,
    random_prompt,
    run_decode,
    run_prefill,
    settled,
    temp_workdir,
    tiny_block_shape,
    wait_delta,
    wait_for,
)
from kvtransfer import protocol
from kvtransfer.framing import transfer_messages
from kvtransfer.endpoints import rank_endpoint
from kvtransfer.handoff import new_transfer_id, prompt_hash
from common.sockets import socket

pytestmark = pytest.mark.slow

TP = 2
LENGTHS = [1, 17, 127, 128, 129, 300, 513]


@pytest.fixture(scope="module")
def tp_cluster():
    from types import SimpleNamespace

    from vllm import LLM

    from engine.config import cpu_binding, tiny_model_settings

    workdir = temp_workdir()
    endpoint = f"ipc://{workdir}/decode.sock"
    prefill_config = kvtransfer.connector_config(
        "producer", stats_path=f"{workdir}/prefill.json", ack_timeout_s=3, send_timeout_ms=2000
    )
    decode_config = kvtransfer.connector_config(
        "consumer", listen_endpoint=endpoint, stats_path=f"{workdir}/decode.json", load_timeout_s=4, transfer_timeout_s=3
    )
    tiny_model_settings().apply_process_env()
    producer_tp1_config = kvtransfer.connector_config(
        "producer", stats_path=f"{workdir}/prefill-tp1.json", ack_timeout_s=3, send_timeout_ms=2000
    )
    prefill_tp1 = LLM(**tiny_model_settings(kv_transfer_config=producer_tp1_config).engine_kwargs())
    consumer_tp1_config = kvtransfer.connector_config(
        "consumer", listen_endpoint=f"ipc://{workdir}/decode-tp1.sock", stats_path=f"{workdir}/decode-tp1.json",
        load_timeout_s=4, transfer_timeout_s=3,
    )
    decode_tp1 = LLM(**tiny_model_settings(kv_transfer_config=consumer_tp1_config).engine_kwargs())
    # Only these engines get one core per rank: the variable is read when their
    # workers start, and the session's TP=1 engines must keep both cores.
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(TP)
    try:
        engines = [
            LLM(**tiny_model_settings(tensor_parallel_size=TP, kv_transfer_config=c, extra={"distributed_executor_backend": "mp"}).engine_kwargs())
            for c in (prefill_config, decode_config)
        ]
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    cluster = SimpleNamespace(
        prefill=engines[0], decode=engines[1], decode_endpoint=endpoint, prefill_tp1=prefill_tp1,
        decode_tp1=decode_tp1, decode_tp1_endpoint=f"ipc://{workdir}/decode-tp1.sock",
        decode_tp1_stats=lambda: kvtransfer.read_stats(kvtransfer.stats_path(consumer_tp1_config)),
        prefill_config=prefill_config, decode_config=decode_config,
        decode_stats=lambda: kvtransfer.read_stats(kvtransfer.stats_path(decode_config)),
        prefill_stats=lambda: kvtransfer.read_stats(kvtransfer.stats_path(prefill_config)),
    )
    yield cluster
    for engine in (*engines, prefill_tp1, decode_tp1):
        engine.llm_engine.engine_core.shutdown()


def run_local(engine, prompts: list[list[int]]) -> list[list[int]]:
    outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], [greedy() for _ in prompts], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_tp2_token_equality_every_rank_moves_its_shard(tp_cluster):
    prompts = [random_prompt(n, seed=300 + n) for n in LENGTHS]
    expected = run_local(tp_cluster.decode, prompts)
    before = settled(tp_cluster.decode_stats)
    handoffs = run_prefill(tp_cluster, prompts, decode_tp=TP)
    assert all(h and h.get("do_remote_prefill") for h in handoffs), handoffs
    got = run_decode(tp_cluster, prompts, handoffs)
    assert got == expected
    assert all(len(tokens) == DECODE_TOKENS for tokens in got)
    # Each rank loaded its own half of every prompt's KV; nothing was recomputed.
    want = TP * len(prompts)
    moved = wait_for(
        lambda: (d := deltas(before, tp_cluster.decode_stats()))["transfers_loaded_ok"] >= want and d,
        what=f"{want} shard loads",
    )
    assert moved["transfers_loaded_ok"] == want, moved
    assert moved["transfers_loaded_failed"] == 0, moved
    stats_file = Path(kvtransfer.stats_path(tp_cluster.decode_config))
    assert stats_file.with_name(stats_file.name + ".rank1").exists()  # rank 1 publishes its own counters


def test_tp_mismatch_is_refused_and_decode_recomputes(tp_cluster):
    """KV shaped for a TP=1 engine (all KV heads per block) sent to TP=2 decode:
    rank 0 refuses it before buffering, rank 1 never gets its shard; the
    request recomputes and still returns the right tokens."""
    import torch
    import zmq

    prompt = random_prompt(200, seed=77)
    expected = run_local(tp_cluster.decode, [prompt])
    full_heads = torch.randn(num_kv_layers(), -(-len(prompt) // BLOCK_SIZE), *tiny_block_shape())  # a TP=1 cache's blocks
    transfer_id = new_transfer_id()
    before = settled(tp_cluster.decode_stats)
    with socket(zmq.Context.instance(), zmq.DEALER, rank_endpoint(tp_cluster.decode_endpoint, 0), bind=False, recv_timeout_ms=5000) as sock:
        for frames in transfer_messages(transfer_id, full_heads, num_tokens=len(prompt), prompt_hash=prompt_hash(prompt)):
            sock.send_multipart(frames)
        ack = protocol.decode_header(sock.recv_multipart()[-1], protocol.Limits())
    assert not ack.ok and "tensor_parallel_size" in ack.error, ack
    got = run_decode(tp_cluster, [prompt], [handoff_for(prompt, transfer_id)])
    assert got == expected
    failed = wait_delta(before, tp_cluster.decode_stats, "transfers_loaded_failed")
    assert failed["transfers_loaded_failed"] >= 1 and failed["frames_refused"] >= 1, failed


def test_tp1_prefill_splits_its_heads_between_tp2_decode_ranks(tp_cluster):
    from types import SimpleNamespace

    prompts = [random_prompt(n, seed=500 + n) for n in (5, 128, 129, 400)]
    expected = run_local(tp_cluster.decode, prompts)
    before = settled(tp_cluster.decode_stats)
    producer = SimpleNamespace(prefill=tp_cluster.prefill_tp1, decode_endpoint=tp_cluster.decode_endpoint)
    handoffs = run_prefill(producer, prompts, decode_tp=TP)
    got = run_decode(tp_cluster, prompts, handoffs)
    assert got == expected
    want = TP * len(prompts)  # every decode rank loaded its half of the heads
    moved = wait_for(
        lambda: (d := deltas(before, tp_cluster.decode_stats()))["transfers_loaded_ok"] >= want and d,
        what=f"{want} shard loads",
    )
    assert moved["transfers_loaded_ok"] == want and moved["transfers_loaded_failed"] == 0, moved


def test_tp1_decode_assembles_its_heads_from_both_tp2_prefill_ranks(tp_cluster):
    from types import SimpleNamespace

    prompts = [random_prompt(n, seed=700 + n) for n in (3, 128, 200, 450)]
    expected = run_local(tp_cluster.decode_tp1, prompts)
    before = settled(tp_cluster.decode_tp1_stats)
    producer = SimpleNamespace(prefill=tp_cluster.prefill, decode_endpoint=tp_cluster.decode_tp1_endpoint)
    handoffs = run_prefill(producer, prompts, decode_tp=1)
    assert all(h and h.get("prefill_tp") == TP for h in handoffs), handoffs
    consumer = SimpleNamespace(decode=tp_cluster.decode_tp1)
    got = run_decode(consumer, prompts, handoffs)
    assert got == expected
    moved = wait_for(
        lambda: (d := deltas(before, tp_cluster.decode_tp1_stats()))["transfers_loaded_ok"] >= len(prompts) and d,
        what=f"{len(prompts)} loads",
    )
    assert moved["transfers_loaded_ok"] == len(prompts) and moved["transfers_loaded_failed"] == 0, moved
    assert moved["bytes_received"] > 0
