"""Real engines, real sockets: prefill engine -> HexKVConnector -> decode engine.

One module-scoped cluster (prefill, decode, colocated reference) serves every
test here. Each test checks both the tokens and the decode worker's counters,
so that "equal output" cannot come from decode silently recomputing.
"""

from __future__ import annotations

import math
import signal
import textwrap

import pytest
import torch
import zmq

from kvt_engines import (
    deltas,
    handoff_for,
    settled,
    wait_delta,
    BLOCK_SIZE,
    build_cluster,
    num_kv_layers,
    random_prompt,
    run_decode,
    run_prefill,
    run_reference,
    spawn_python,
    temp_workdir,
    tiny_block_shape,
    wait_for,
)
from kvtransfer import protocol
from kvtransfer.framing import transfer_messages
from kvtransfer.handoff import new_transfer_id, prompt_hash
from common.sockets import socket

pytestmark = pytest.mark.slow

# 1 token .. several blocks, around every block boundary, none a multiple only.
LENGTHS = [1, 2, 5, 17, 31, 64, 100, 127, 128, 129, 200, 255, 256, 257, 300, 383, 384, 385, 450, 511, 512, 513, 600, 700]


@pytest.fixture(scope="module")
def cluster(reference_llm):
    c = build_cluster(temp_workdir(), reference_llm)
    yield c
    for engine in (c.prefill, c.decode):
        engine.llm_engine.engine_core.shutdown()  # stops EngineCore and its Worker process


def prompt_kv(prompt: list[int], fill: str = "random") -> torch.Tensor:
    blocks = -(-len(prompt) // BLOCK_SIZE)
    shape = (num_kv_layers(), blocks, *tiny_block_shape())
    return torch.zeros(shape) if fill == "zeros" else torch.randn(shape, generator=torch.Generator().manual_seed(7))


def send_messages(endpoint: str, messages, *, want_ack: bool = True):
    ctx = zmq.Context.instance()
    with socket(ctx, zmq.DEALER, endpoint, bind=False, recv_timeout_ms=10000) as sock:
        for frames in messages:
            sock.send_multipart(frames)
        if want_ack:
            return protocol.decode_header(sock.recv_multipart()[-1], protocol.Limits())
    return None


# -- token equality ---------------------------------------------------------------------------


def test_token_equality_many_prompts_in_flight(cluster):
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    before_d, before_p = settled(cluster.decode_stats), settled(cluster.prefill_stats)
    handoffs = run_prefill(cluster, prompts)
    assert all(h and h["do_remote_prefill"] and h["num_prompt_tokens"] == len(p) for h, p in zip(handoffs, prompts))
    decoded = run_decode(cluster, prompts, handoffs)
    expected = run_reference(cluster, prompts)
    for n, got, want in zip(LENGTHS, decoded, expected):
        assert got == want, f"prompt of {n} tokens: decode {got} != colocated {want}"
    d = wait_for(lambda: (x := deltas(before_d, cluster.decode_stats()))["transfers_loaded_ok"] >= len(prompts) and x, what="loads")
    assert d["transfers_loaded_ok"] == len(prompts) and d["transfers_loaded_failed"] == 0
    assert d["transfers_loaded_sync"] >= 1  # KV that arrived before its request loads in the admitting step
    p = wait_for(lambda: (x := deltas(before_p, cluster.prefill_stats()))["transfers_sent_ok"] >= len(prompts) and x, what="acks")
    assert p["transfers_sent_failed"] == 0 and p["bytes_sent"] == d["bytes_received"] > 0


def test_decode_really_uses_the_transferred_kv(cluster):
    """Valid frames carrying the wrong KV for a prompt change decode's output."""
    prompt = random_prompt(40, seed=1001)
    transfer_id = new_transfer_id()
    before = settled(cluster.decode_stats)
    ack = send_messages(cluster.decode_endpoint, transfer_messages(transfer_id, prompt_kv(prompt), num_tokens=len(prompt), prompt_hash=prompt_hash(prompt)))
    assert ack.ok, ack.error
    (decoded,) = run_decode(cluster, [prompt], [handoff_for(prompt, transfer_id)])
    (expected,) = run_reference(cluster, [prompt])
    assert decoded != expected
    assert wait_delta(before, cluster.decode_stats, "transfers_loaded_ok")["transfers_loaded_failed"] == 0


# -- synchronous fast path and asynchronous load -----------------------------------------------


def test_arrived_kv_loads_in_the_step_that_admits_the_request(cluster):
    prompts = [random_prompt(n, seed=1500 + n) for n in (3, 16, 77, 300)]
    before_p = settled(cluster.prefill_stats)
    handoffs = run_prefill(cluster, prompts)
    # Every Ack is in: the decode worker holds each transfer complete (and marked).
    wait_for(lambda: deltas(before_p, cluster.prefill_stats())["transfers_sent_ok"] >= len(prompts), what="acks")
    before = settled(cluster.decode_stats)
    assert run_decode(cluster, prompts, handoffs) == run_reference(cluster, prompts)
    d = wait_for(lambda: (x := deltas(before, cluster.decode_stats()))["transfers_loaded_ok"] >= len(prompts) and x)
    assert d["transfers_loaded_sync"] == len(prompts) and d["transfers_loaded_failed"] == 0


def test_kv_arriving_after_its_request_loads_asynchronously(cluster):
    """The decode request is admitted first and waits (WAITING_FOR_REMOTE_KVS); the
    KV, sent late, is loaded then (it is random, so the output differs from the reference)."""
    import threading

    prompt = random_prompt(40, seed=1600)
    transfer_id = new_transfer_id()
    messages = transfer_messages(transfer_id, prompt_kv(prompt), num_tokens=len(prompt), prompt_hash=prompt_hash(prompt))
    late = threading.Timer(1.0, send_messages, args=(cluster.decode_endpoint, messages))
    before = settled(cluster.decode_stats)
    late.start()
    (decoded,) = run_decode(cluster, [prompt], [handoff_for(prompt, transfer_id)])
    late.join()
    assert decoded != run_reference(cluster, [prompt])[0]
    d = wait_delta(before, cluster.decode_stats, "transfers_loaded_ok")
    assert d["transfers_loaded_ok"] == 1 and d["transfers_loaded_sync"] == 0 and d["transfers_loaded_failed"] == 0


def test_stale_arrival_mark_recomputes_through_vllms_invalid_blocks(cluster):
    """The scheduler sees a mark but the worker finds no KV (as if its lease had just
    ended): the synchronous load reports its blocks invalid and vLLM recomputes them."""
    from kvtransfer.arrivals import mark_path

    prompt = random_prompt(70, seed=1700)
    transfer_id = "stale-" + new_transfer_id()
    mark = mark_path(cluster.decode_endpoint, transfer_id)
    mark.touch()
    try:
        before = settled(cluster.decode_stats)
        assert run_decode(cluster, [prompt], [handoff_for(prompt, transfer_id)]) == run_reference(cluster, [prompt])
    finally:
        mark.unlink(missing_ok=True)
    d = wait_delta(before, cluster.decode_stats, "transfers_loaded_failed")
    assert d["transfers_loaded_failed"] == 1 and d["transfers_loaded_sync"] == 0 and d["load_timeouts"] == 0


# -- edge cases -------------------------------------------------------------------------------


def test_prefill_token_is_a_stop_token_kv_still_handed_over(cluster):
    prompts = [random_prompt(n, seed=2000 + n) for n in (9, 33)]
    first_tokens = [out[0] for out in run_reference(cluster, prompts)]
    handoffs = []
    for prompt, stop in zip(prompts, first_tokens):
        (h,) = run_prefill(cluster, [prompt], stop_token_ids=[stop])
        handoffs.append(h)
    assert all(h and h["do_remote_prefill"] for h in handoffs)
    before = settled(cluster.decode_stats)
    assert run_decode(cluster, prompts, handoffs) == run_reference(cluster, prompts)
    d = wait_for(lambda: (x := deltas(before, cluster.decode_stats()))["transfers_loaded_ok"] >= 2 and x)
    assert d["transfers_loaded_failed"] == 0


def test_decode_prefix_cache_hit_loads_only_the_tail(cluster):
    prompt = random_prompt(300, seed=3000)
    expected = run_reference(cluster, [prompt])
    for _ in range(2):  # the second time decode (and prefill) hold the first 2 blocks already
        before = settled(cluster.decode_stats)
        handoffs = run_prefill(cluster, [prompt])
        assert run_decode(cluster, [prompt], handoffs) == expected
        d = wait_delta(before, cluster.decode_stats, "transfers_loaded_ok")
        assert d["transfers_loaded_ok"] == 1 and d["transfers_loaded_failed"] == 0


def test_blocks_decode_already_holds_do_not_travel(cluster):
    """The router saw decode hold the prompt's first blocks: prefill sends only the rest."""
    conversation = random_prompt(300, seed=3100)  # 2 full blocks of 128 and a partial one
    run_decode(cluster, [conversation], run_prefill(cluster, [conversation]))  # decode now holds 2 blocks
    follow_up = conversation + random_prompt(100, seed=3101)  # 400 tokens: 4 blocks, the first 2 held
    before = settled(cluster.decode_stats)
    handoffs = run_prefill(cluster, [follow_up], skip_blocks=2)
    assert run_decode(cluster, [follow_up], handoffs) == run_reference(cluster, [follow_up])
    d = wait_delta(before, cluster.decode_stats, "transfers_loaded_ok")
    block_bytes = math.prod(tiny_block_shape()) * 4  # float32
    assert d["bytes_received"] == (4 - 2) * num_kv_layers() * block_bytes
    assert d["transfers_loaded_failed"] == 0 and d["transfers_missing_prefix"] == 0


def test_skipped_blocks_decode_no_longer_holds_are_recomputed(cluster):
    """The router's view was stale (decode evicted the blocks): decode recomputes, still token-equal."""
    prompt = random_prompt(400, seed=3200)  # decode has never seen it
    before = settled(cluster.decode_stats)
    handoffs = run_prefill(cluster, [prompt], skip_blocks=2)
    assert run_decode(cluster, [prompt], handoffs) == run_reference(cluster, [prompt])
    d = wait_delta(before, cluster.decode_stats, "transfers_missing_prefix")
    assert d["transfers_missing_prefix"] == 1 and d["transfers_loaded_failed"] == 1


def test_parallel_sampling_children_share_one_transfer(cluster):
    from vllm import SamplingParams

    prompt = random_prompt(140, seed=3200)
    (handoff,) = run_prefill(cluster, [prompt])
    before = settled(cluster.decode_stats)
    # vLLM refuses n > 1 with temperature 0; 1e-5 samples the argmax all the same.
    params = SamplingParams(n=2, max_tokens=8, temperature=1e-5, seed=0, ignore_eos=True, extra_args={"kv_transfer_params": handoff})
    out = cluster.decode.generate([{"prompt_token_ids": prompt}], [params], use_tqdm=False)[0]
    (expected,) = run_reference(cluster, [prompt])
    assert [list(c.token_ids) for c in out.outputs] == [expected[:8]] * 2
    d = wait_for(lambda: (x := deltas(before, cluster.decode_stats()))["transfers_loaded_ok"] >= 2 and x)
    assert d["transfers_loaded_ok"] == 2 and d["transfers_loaded_failed"] == 0


def test_decode_request_aborted_while_waiting_for_kv(cluster):
    """An abort while waiting releases the request: no load timeout is ever counted."""
    import time

    engine = cluster.decode.llm_engine
    prompt = random_prompt(30, seed=3300)
    before = settled(cluster.decode_stats)
    from kvt_engines import greedy

    params = greedy(extra_args={"kv_transfer_params": handoff_for(prompt, "never-sent-" + new_transfer_id())})
    engine.add_request("abort-me", {"prompt_token_ids": prompt}, params)
    time.sleep(1)  # EngineCore (its own process) parks it in WAITING_FOR_REMOTE_KVS
    engine.abort_request(["abort-me"])
    time.sleep(5)  # longer than load_timeout_s: a leaked wait would now count a timeout
    (decoded,) = run_decode(cluster, [prompt], [None])  # the engine still serves
    assert decoded == run_reference(cluster, [prompt])[0]
    d = deltas(before, cluster.decode_stats())
    assert d["load_timeouts"] == 0 and d["transfers_loaded_failed"] == 0


def test_shared_prefix_between_requests(cluster):
    base = random_prompt(256, seed=3100)
    prompts = [base + random_prompt(n, seed=3100 + n) for n in (1, 5, 20)]
    handoffs = run_prefill(cluster, prompts)
    assert run_decode(cluster, prompts, handoffs) == run_reference(cluster, prompts)


# -- failures: decode recomputes, the request completes, the failure is counted ---------------


def test_missing_transfer_times_out_and_recomputes(cluster):
    prompt = random_prompt(20, seed=4000)
    before = settled(cluster.decode_stats)
    decoded = run_decode(cluster, [prompt], [handoff_for(prompt, "never-sent-" + new_transfer_id())])
    assert decoded == run_reference(cluster, [prompt])
    d = wait_delta(before, cluster.decode_stats, "load_timeouts")
    assert d["load_timeouts"] == 1 and d["transfers_loaded_failed"] == 1


def test_corrupt_transfer_refused_and_recomputed(cluster):
    prompt = random_prompt(50, seed=4100)
    transfer_id = new_transfer_id()
    messages = transfer_messages(transfer_id, prompt_kv(prompt), num_tokens=len(prompt), prompt_hash=prompt_hash(prompt))
    payload = bytearray(messages[2][1])
    payload[100] ^= 0xFF
    messages[2][1] = bytes(payload)
    before = settled(cluster.decode_stats)
    ack = send_messages(cluster.decode_endpoint, messages[:3])
    assert not ack.ok and "checksum" in ack.error
    assert run_decode(cluster, [prompt], [handoff_for(prompt, transfer_id)]) == run_reference(cluster, [prompt])
    d = wait_delta(before, cluster.decode_stats, "transfers_loaded_failed")
    assert d["transfers_loaded_failed"] == 1 and d["frames_refused"] >= 1 and d["load_timeouts"] == 0


def test_kv_for_another_prompt_is_not_used(cluster):
    prompt, other = random_prompt(30, seed=4200), random_prompt(30, seed=4201)
    (handoff,) = run_prefill(cluster, [other])
    before = settled(cluster.decode_stats)
    assert run_decode(cluster, [prompt], [handoff]) == run_reference(cluster, [prompt])
    d = wait_delta(before, cluster.decode_stats, "transfers_loaded_failed")
    assert d["transfers_loaded_failed"] == 1
    # Refused from the handoff, before any load: its prompt hash is not this prompt's.
    assert d["transfers_refused_prompt_hash"] == 1 and d["transfers_loaded_ok"] == 0


def test_a_handoff_of_another_protocol_version_is_refused_then_the_right_one_loads(cluster):
    prompt = random_prompt(40, seed=4250)
    (handoff,) = run_prefill(cluster, [prompt])
    before = settled(cluster.decode_stats)
    stale = dict(handoff, kv_protocol_version=handoff["kv_protocol_version"] + 1)
    assert run_decode(cluster, [prompt], [stale]) == run_reference(cluster, [prompt])
    d = wait_delta(before, cluster.decode_stats, "transfers_refused_version")
    assert d["transfers_refused_version"] == 1 and d["transfers_loaded_failed"] == 1 and d["transfers_loaded_ok"] == 0
    # The KV itself was fine: the handoff as prefill wrote it loads it (and nothing is left to expire).
    before = settled(cluster.decode_stats)
    assert run_decode(cluster, [prompt], [handoff]) == run_reference(cluster, [prompt])
    assert wait_delta(before, cluster.decode_stats, "transfers_loaded_ok")["transfers_loaded_ok"] == 1


def test_unclaimed_kv_expires_under_lease(cluster):
    prompt = random_prompt(25, seed=4300)
    before = settled(cluster.decode_stats)
    (handoff,) = run_prefill(cluster, [prompt])  # decode never asks for it
    d = wait_delta(before, cluster.decode_stats, "lease_expiries", timeout_s=30)
    assert d["lease_expiries"] == 1
    # Claiming after the lease: decode waits, gives up and recomputes.
    assert run_decode(cluster, [prompt], [handoff]) == run_reference(cluster, [prompt])


# -- a peer killed mid-transfer; the survivor keeps serving ----------------------------------

FAKE_DECODE = """
import zmq, sys
from common.sockets import make_socket
sock = make_socket(zmq.Context(), zmq.ROUTER, {endpoint!r}, bind=True)
print("ready", flush=True)
sock.recv_multipart(); sock.recv_multipart()   # Begin and one chunk, then hang
print("mid-transfer", flush=True)
import time; time.sleep(600)
"""

FAKE_PREFILL = """
import pickle, time, zmq
from common.sockets import make_socket
messages = pickle.load(open({path!r}, "rb"))
sock = make_socket(zmq.Context(), zmq.DEALER, {endpoint!r}, bind=False)
for frames in messages[: len(messages) // 2]:
    sock.send_multipart(frames)
print("mid-transfer", flush=True)
time.sleep(600)
"""


def test_decode_killed_mid_transfer_prefill_keeps_serving(cluster, tmp_path):
    endpoint = f"ipc://{tmp_path}/fake-decode.sock"
    fake = spawn_python(textwrap.dedent(FAKE_DECODE.format(endpoint=endpoint)))
    try:
        assert fake.stdout.readline().strip() == "ready"
        before = settled(cluster.prefill_stats)
        from vllm import SamplingParams

        from kvtransfer.handoff import prefill_params

        prompt = random_prompt(300, seed=5000)
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": prefill_params(endpoint)})
        out = cluster.prefill.generate([{"prompt_token_ids": prompt}], [params], use_tqdm=False)
        assert out[0].kv_transfer_params["do_remote_prefill"]  # prefill itself completed
        assert fake.stdout.readline().strip() == "mid-transfer"
        fake.send_signal(signal.SIGKILL)
        fake.wait(10)
        d = wait_delta(before, cluster.prefill_stats, "transfers_sent_failed")
        assert d["transfers_sent_failed"] == 1 and d["transfers_sent_ok"] == 0
    finally:
        fake.kill()
        fake.wait(10)
    # The prefill engine still serves, and the real decode still decodes from it.
    prompts = [random_prompt(n, seed=5100 + n) for n in (10, 40)]
    assert run_decode(cluster, prompts, run_prefill(cluster, prompts)) == run_reference(cluster, prompts)


def test_prefill_killed_mid_transfer_decode_recomputes(cluster, tmp_path):
    import pickle

    prompt = random_prompt(400, seed=6000)
    transfer_id = new_transfer_id()
    messages = transfer_messages(transfer_id, prompt_kv(prompt), num_tokens=len(prompt), prompt_hash=prompt_hash(prompt))
    path = tmp_path / "messages.pkl"
    path.write_bytes(pickle.dumps([[bytes(f) for f in m] for m in messages]))
    before = settled(cluster.decode_stats)
    fake = spawn_python(textwrap.dedent(FAKE_PREFILL.format(path=str(path), endpoint=cluster.decode_endpoint)))
    try:
        assert fake.stdout.readline().strip() == "mid-transfer"
        fake.send_signal(signal.SIGKILL)
        fake.wait(10)
    finally:
        fake.kill()
        fake.wait(10)
    assert run_decode(cluster, [prompt], [handoff_for(prompt, transfer_id)]) == run_reference(cluster, [prompt])
    d = wait_delta(before, cluster.decode_stats, "transfers_loaded_failed")
    # The truncated transfer was refused (a load of it would not count as failed).
    # Only failures are compared: under load, earlier tests' successful loads
    # can still be published inside this window.
    assert d["transfers_loaded_failed"] == 1
    # Decode still takes transfers afterwards.
    prompts = [random_prompt(35, seed=6100)]
    assert run_decode(cluster, prompts, run_prefill(cluster, prompts)) == run_reference(cluster, prompts)
