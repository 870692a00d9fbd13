"""Pipeline parallelism: each stage moves its own layers, stages split differently on each side.

The tiny model has 4 layers. Prefill runs 2 stages of 1 + 3 layers, decode 2
stages of 3 + 1, so every split boundary differs: decode stage 0 (layers 0-2)
assembles its cache from prefill stage 0 (layer 0) and stage 1 (layers 1-2);
decode stage 1 (layer 3) gets its one layer from prefill stage 1. One-stage
engines on either side check the other two shapes of handoff. Prefill is
chunked (128 tokens a step), so long prompts reach decode step by step from
every stage. The reference
is each decode engine running the prompt itself, so greedy tokens must agree.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

import kvtransfer
from kvt_engines import DECODE_TOKENS, deltas, greedy, random_prompt, run_decode, run_prefill, settled, temp_workdir, wait_for

pytestmark = pytest.mark.slow

PREFILL_LAYERS = [1, 3]
DECODE_LAYERS = [3, 1]
LENGTHS = [1, 17, 128, 129, 300]
CHUNK_TOKENS = 128  # prefill's max_num_batched_tokens: 129 and 300 tokens take 2 and 3 steps


@contextmanager
def pipeline_env(layers: list[int]):
    """vLLM reads these when an engine's processes start: the layer split, one core per stage."""
    from engine.config import cpu_binding

    values = {"VLLM_PP_LAYER_PARTITION": ",".join(map(str, layers)), "VLLM_CPU_OMP_THREADS_BIND": cpu_binding(len(layers))}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def pp_cluster():
    from vllm import LLM

    from engine.config import tiny_model_settings

    workdir = temp_workdir()
    tiny_model_settings().apply_process_env()

    def producer(name):
        return kvtransfer.connector_config("producer", stats_path=f"{workdir}/{name}.json", ack_timeout_s=3, send_timeout_ms=2000)

    def consumer(name):
        return kvtransfer.connector_config(
            "consumer", listen_endpoint=f"ipc://{workdir}/{name}.sock", stats_path=f"{workdir}/{name}.json",
            load_timeout_s=4, transfer_timeout_s=3,
        )

    def engine(config, layers=None):
        # Prefill engines compute at most 128 tokens per step, so prompts past one
        # block are prefilled in chunks and each stage ships its blocks step by step.
        extra = {"max_num_batched_tokens": CHUNK_TOKENS} if "producer" in config["kv_role"] else {}
        if layers is None:
            return LLM(**tiny_model_settings(kv_transfer_config=config, extra=extra).engine_kwargs())
        extra["distributed_executor_backend"] = "mp"
        with pipeline_env(layers):
            return LLM(**tiny_model_settings(pipeline_parallel_size=len(layers), kv_transfer_config=config, extra=extra).engine_kwargs())

    configs = {name: (producer if name.startswith("prefill") else consumer)(name) for name in ("prefill_pp", "decode_pp", "prefill_1", "decode_1")}
    engines = {
        "prefill_pp": engine(configs["prefill_pp"], PREFILL_LAYERS),
        "decode_pp": engine(configs["decode_pp"], DECODE_LAYERS),
        "prefill_1": engine(configs["prefill_1"]),
        "decode_1": engine(configs["decode_1"]),
    }

    def pair(prefill, decode):
        return SimpleNamespace(
            prefill=engines[prefill], decode=engines[decode], decode_endpoint=configs[decode]["kv_connector_extra_config"]["listen_endpoint"],
            decode_stats=lambda: kvtransfer.read_stats(kvtransfer.stats_path(configs[decode])),
        )

    yield pair
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


def local_tokens(engine, prompts):
    outputs = engine.generate([{"prompt_token_ids": p} for p in prompts], [greedy() for _ in prompts], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def check_handoff(cluster, prompts, *, decode_layers, loads_per_prompt, expect_failures=False):
    expected = local_tokens(cluster.decode, prompts)
    before = settled(cluster.decode_stats)
    handoffs = run_prefill(cluster, prompts, decode_layers=decode_layers)
    assert all(h and h.get("do_remote_prefill") for h in handoffs), handoffs
    got = run_decode(cluster, prompts, handoffs)
    assert got == expected and all(len(tokens) == DECODE_TOKENS for tokens in got)
    counter = "transfers_loaded_failed" if expect_failures else "transfers_loaded_ok"
    want = loads_per_prompt * len(prompts)
    moved = wait_for(lambda: (d := deltas(before, cluster.decode_stats()))[counter] >= want and d, what=f"{want} {counter}")
    return handoffs, moved


def test_pipelined_prefill_to_pipelined_decode_with_another_split(pp_cluster):
    prompts = [random_prompt(n, seed=900 + n) for n in LENGTHS]
    handoffs, moved = check_handoff(pp_cluster("prefill_pp", "decode_pp"), prompts, decode_layers=DECODE_LAYERS, loads_per_prompt=2)
    assert all(h["prefill_layers"] == PREFILL_LAYERS for h in handoffs)
    # Both decode stages loaded every prompt's layers (two parts for stage 0), none recomputed.
    assert moved["transfers_loaded_ok"] == 2 * len(prompts) and moved["transfers_loaded_failed"] == 0, moved


def test_pipelined_prefill_to_one_stage_decode(pp_cluster):
    prompts = [random_prompt(n, seed=1100 + n) for n in LENGTHS]
    _, moved = check_handoff(pp_cluster("prefill_pp", "decode_1"), prompts, decode_layers=None, loads_per_prompt=1)
    assert moved["transfers_loaded_ok"] == len(prompts) and moved["transfers_loaded_failed"] == 0, moved


def test_one_stage_prefill_to_pipelined_decode(pp_cluster):
    prompts = [random_prompt(n, seed=1300 + n) for n in LENGTHS]
    handoffs, moved = check_handoff(pp_cluster("prefill_1", "decode_pp"), prompts, decode_layers=DECODE_LAYERS, loads_per_prompt=2)
    assert all("prefill_layers" not in h for h in handoffs)
    assert moved["transfers_loaded_ok"] == 2 * len(prompts) and moved["transfers_loaded_failed"] == 0, moved


def test_a_wrong_decode_split_is_refused_and_decode_recomputes(pp_cluster):
    """The router names decode's split as 2 + 2 layers (it is 3 + 1): prefill's
    parts then hold the wrong layers for both decode stages, which refuse them
    (by layer range, before or after buffering); the prompts recompute, tokens
    are still right."""
    prompts = [random_prompt(n, seed=1500 + n) for n in (40, 200)]
    _, moved = check_handoff(pp_cluster("prefill_pp", "decode_pp"), prompts, decode_layers=[2, 2], loads_per_prompt=1, expect_failures=True)
    assert moved["transfers_loaded_ok"] == 0, moved
