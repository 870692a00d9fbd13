"""TP x PP handoffs between connector worker sides, over real sockets, without vLLM.

Engines with TP x PP ranks cannot run on this 2-core machine (the engine
tests cover TP=2 and PP=2 each), so here every rank is a `WorkerSide` with
its own slice of a model's KV cache, as vLLM would give it: its stage's
layers, its TP rank's heads. Prefill ranks send over ZeroMQ exactly as in an
engine; decode ranks load into their caches. Every decode rank must end
with exactly the true KV of its layers and heads in the request's blocks.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvtransfer.handoff import prompt_hash
from kvtransfer.options import ConnectorOptions
from kvtransfer.reshard import stage_ranges
from kvtransfer.metadata import HexConnectorMetadata, LoadSpec, SendSpec
from kvtransfer.worker_side import WorkerSide

LAYERS, HEADS, BLOCK_TOKENS, HEAD_DIM = 4, 4, 16, 8  # sizes differ: the head axis is found by size
NUM_BLOCKS = 8  # per rank's cache
PROMPT = list(range(40))  # 3 blocks
PREFILL_BLOCKS, DECODE_BLOCKS = [5, 2, 7], [1, 3, 6]  # physical ids on each side


def layer_name(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.attn"


def ranks(tp: int, layers: tuple[int, ...]):
    """(pp_rank, tp_rank, layer range, head slice) of every rank of an engine."""
    per = HEADS // tp
    return [(s, r, range(lo, hi), slice(r * per, (r + 1) * per)) for s, (lo, hi) in enumerate(stage_ranges(layers)) for r in range(tp)]


def side(tp: int, layers: tuple[int, ...], pp_rank: int, tp_rank: int, max_chunk_bytes: int = 1, **options) -> WorkerSide:
    return WorkerSide(
        ConnectorOptions(max_chunk_bytes=max_chunk_bytes, ack_timeout_s=5, **options), is_producer="listen_endpoint" not in options,
        is_consumer="listen_endpoint" in options, num_blocks=NUM_BLOCKS, rank=tp_rank, tp_size=tp, kv_heads=HEADS // tp,
        pp_rank=pp_rank, pp_size=len(layers), total_layers=LAYERS,
    )


def headers(frames: list) -> list:
    """The protocol messages' headers in one ZeroMQ message (Begin and End ride with Chunks)."""
    from kvtransfer.protocol import Chunk, Limits, decode_header

    found, index = [], 0
    while index < len(frames):
        header = decode_header(frames[index], Limits())
        found.append(header)
        index += 2 if isinstance(header, Chunk) else 1  # a Chunk's header and its one payload frame
    return found


def count_chunk_messages(worker: WorkerSide) -> list[int]:
    """Wrap the worker's sender so every Chunk message submitted is counted (with its layers)."""
    from kvtransfer.protocol import Chunk

    counts: list[int] = []
    submit = worker.sender.submit

    def counting(endpoint, transfer_id, frames, nbytes, **kwargs):
        layers = [h.num_layers for h in headers(frames) if isinstance(h, Chunk)]
        if layers:
            counts.append(sum(layers))  # layers in this message
        return submit(endpoint, transfer_id, frames, nbytes, **kwargs)

    worker.sender.submit = counting
    return counts


# max_chunk_bytes=1: every block of every layer its own message; 1 MiB: each
# part's layers packed into one message per step (the default for short prompts);
# TWO_BLOCKS: two ranges per layer (2 blocks, then 1), one message per range and layer.
TWO_BLOCKS = -2


@pytest.mark.parametrize("max_chunk_bytes", [1, TWO_BLOCKS, 1 << 20])
@pytest.mark.parametrize(
    "prefill_tp, prefill_layers, decode_tp, decode_layers",
    [
        (2, (1, 3), 1, (3, 1)),  # heads merged, every stage boundary differs
        (1, (2, 2), 2, (1, 3)),  # heads split, stage boundaries differ
        (2, (4,), 2, (2, 2)),  # same TP, only decode pipelined
        (1, (1, 1, 2), 1, (4,)),  # three prefill stages into one decode rank
        (2, (2, 2), 2, (2, 2)),  # same everything: rank to rank
    ],
)
def test_every_decode_rank_gets_exactly_its_layers_and_heads(tmp_path, prefill_tp, prefill_layers, decode_tp, decode_layers, max_chunk_bytes):
    truth = torch.randn(LAYERS, len(PREFILL_BLOCKS), HEADS, BLOCK_TOKENS, HEAD_DIM)
    endpoint = f"ipc://{tmp_path}/decode.sock"
    decoders = []
    for s, r, layers, heads in ranks(decode_tp, decode_layers):
        worker = side(decode_tp, decode_layers, s, r, listen_endpoint=endpoint)
        caches = {layer_name(l): torch.zeros(NUM_BLOCKS, heads.stop - heads.start, BLOCK_TOKENS, HEAD_DIM) for l in layers}
        worker.register_kv_caches(caches)
        decoders.append((worker, caches, heads))
    send = SendSpec("req", "t1", endpoint, prompt_hash(PROMPT), len(PROMPT), len(PREFILL_BLOCKS), 0, PREFILL_BLOCKS,
                    is_first=True, is_last=True, decode_tp=decode_tp, decode_layers=decode_layers if len(decode_layers) > 1 else None)
    senders, messages = [], []
    if max_chunk_bytes == TWO_BLOCKS:
        max_chunk_bytes = 2 * (HEADS // prefill_tp) * BLOCK_TOKENS * HEAD_DIM * 4  # float32 blocks of a prefill rank
    for s, r, layers, heads in ranks(prefill_tp, prefill_layers):
        worker = side(prefill_tp, prefill_layers, s, r, max_chunk_bytes)
        caches = {}
        for l in layers:
            cache = torch.randn(NUM_BLOCKS, heads.stop - heads.start, BLOCK_TOKENS, HEAD_DIM)
            cache[PREFILL_BLOCKS] = truth[l][:, heads]
            caches[layer_name(l)] = cache
        worker.register_kv_caches(caches)
        messages.append(count_chunk_messages(worker))
        meta = HexConnectorMetadata(sends=[send])
        for name, cache in caches.items():  # as the forward pass calls it, layer by layer
            worker.save_kv_layer(meta, name, cache)
        worker.wait_for_save(meta)
        senders.append(worker)
    try:
        for worker in senders:
            assert worker.sender.wait_idle(10)
            assert all(result == "ok" for result in worker.sender.results.values()), worker.sender.results
        if max_chunk_bytes == 1 << 20:  # packed: one message per part, holding all of the part's layers
            for worker, counts in zip(senders, messages):
                parts = worker.send_path.parts(decode_tp, send.decode_layers)
                assert sorted(counts) == sorted(part.num_layers for part in parts)
        elif max_chunk_bytes > 1:  # two block ranges per layer: a message per range and layer
            for worker, counts in zip(senders, messages):
                parts = worker.send_path.parts(decode_tp, send.decode_layers)
                assert set(counts) == {1} and len(counts) == 2 * sum(part.num_layers for part in parts)
        else:
            assert all(set(counts) == {1} for counts in messages)
        load = LoadSpec("req", "t1", prompt_hash(PROMPT), len(PROMPT), 0, DECODE_BLOCKS, prefill_tp=prefill_tp,
                        prefill_layers=prefill_layers if len(prefill_layers) > 1 else None)
        for worker, caches, heads in decoders:
            worker.start_load_kv(HexConnectorMetadata(loads=[load]))
            deadline = time.monotonic() + 10
            finished, failed = set(), set()
            while "req" not in finished and time.monotonic() < deadline:
                got = worker.take_results(set())
                finished |= got[0]
                failed |= got[1]
                time.sleep(0.01)
            assert finished == {"req"} and not failed
            for name, cache in caches.items():
                layer = int(name.split(".")[2])
                assert torch.equal(cache[DECODE_BLOCKS], truth[layer][:, heads]), (name, heads)
                untouched = [b for b in range(NUM_BLOCKS) if b not in DECODE_BLOCKS]
                assert not cache[untouched].any()
    finally:
        for worker in senders + [d[0] for d in decoders]:
            worker.shutdown()


def test_a_prefill_stage_missing_fails_the_load_so_decode_recomputes(tmp_path):
    """Stage 1 of a two-stage prefill never sends: decode rank 0 (layers 0-3)
    holds stage 0's part but must not load a cache with layers missing."""
    endpoint = f"ipc://{tmp_path}/decode.sock"
    decode = WorkerSide(ConnectorOptions(listen_endpoint=endpoint, load_timeout_s=0.5), is_producer=False, is_consumer=True,
                        num_blocks=NUM_BLOCKS, kv_heads=HEADS, total_layers=LAYERS)
    caches = {layer_name(l): torch.zeros(NUM_BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM) for l in range(LAYERS)}
    decode.register_kv_caches(caches)
    prefill = side(1, (2, 2), 0, 0)
    prefill.register_kv_caches({layer_name(l): torch.randn(NUM_BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM) for l in range(2)})
    send = SendSpec("req", "t1", endpoint, prompt_hash(PROMPT), len(PROMPT), 3, 0, PREFILL_BLOCKS, is_first=True, is_last=True)
    try:
        meta = HexConnectorMetadata(sends=[send])
        for l in range(2):
            prefill.save_kv_layer(meta, layer_name(l), prefill.layout.tensors[l])
        prefill.wait_for_save(meta)
        assert prefill.sender.wait_idle(10)
        decode.start_load_kv(HexConnectorMetadata(loads=[LoadSpec("req", "t1", prompt_hash(PROMPT), len(PROMPT), 0, DECODE_BLOCKS, prefill_layers=(2, 2))]))
        deadline = time.monotonic() + 5
        failed: set[str] = set()
        while not failed and time.monotonic() < deadline:
            failed |= decode.take_results(set())[1]
            time.sleep(0.02)
        assert failed == {"req"}
        assert not any(cache.any() for cache in caches.values())  # nothing half-written
        assert decode.stats.snapshot()["load_timeouts"] == 1
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_aborting_a_request_frees_every_part_at_once(tmp_path):
    """A decode request aborted while waiting: the parts that did arrive (here
    prefill stage 0's) are dropped now, not held until their lease ends."""
    endpoint = f"ipc://{tmp_path}/decode.sock"
    decode = WorkerSide(ConnectorOptions(listen_endpoint=endpoint), is_producer=False, is_consumer=True,
                        num_blocks=NUM_BLOCKS, kv_heads=HEADS, total_layers=LAYERS)
    decode.register_kv_caches({layer_name(l): torch.zeros(NUM_BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM) for l in range(LAYERS)})
    prefill = side(1, (2, 2), 0, 0)
    prefill.register_kv_caches({layer_name(l): torch.randn(NUM_BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM) for l in range(2)})
    send = SendSpec("req", "t1", endpoint, prompt_hash(PROMPT), len(PROMPT), 3, 0, PREFILL_BLOCKS, is_first=True, is_last=True)
    try:
        meta = HexConnectorMetadata(sends=[send])
        for l in range(2):
            prefill.save_kv_layer(meta, layer_name(l), prefill.layout.tensors[l])
        prefill.wait_for_save(meta)
        assert prefill.sender.wait_idle(10)
        decode.start_load_kv(HexConnectorMetadata(loads=[LoadSpec("req", "t1", prompt_hash(PROMPT), len(PROMPT), 0, DECODE_BLOCKS, prefill_layers=(2, 2))]))
        assert decode.receiver.assembler.held_bytes() > 0  # stage 0's part waits for stage 1's
        finished, failed = decode.take_results({"req"})  # vLLM reports the request aborted
        assert finished == {"req"} and not failed
        assert decode.receiver.assembler.held_bytes() == 0
    finally:
        prefill.shutdown()
        decode.shutdown()


@pytest.mark.parametrize("endpoint, kind", [("ipc:///tmp/x.sock", "none"), ("tcp://127.0.0.1:9", "none"), ("tcp://10.1.2.3:9", "xxh3")])
def test_send_path_checksums_by_link_and_packs_small_layers(endpoint, kind):
    """The default checksum policy, as the send path applies it per decode
    endpoint; and a step's small layers leave as one packed message."""
    from kvtransfer.protocol import Begin, Chunk, End

    worker = side(1, (LAYERS,), 0, 0, max_chunk_bytes=1 << 20)
    worker.register_kv_caches({layer_name(l): torch.randn(NUM_BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM) for l in range(LAYERS)})
    sent = []
    worker.sender.close()
    worker.sender.submit = lambda endpoint, transfer_id, frames, nbytes, **kw: sent.append(frames) or True
    worker.send_path.sender = worker.sender
    send = SendSpec("req", "t1", endpoint, prompt_hash(PROMPT), len(PROMPT), 3, 0, PREFILL_BLOCKS, is_first=True, is_last=True)
    meta = HexConnectorMetadata(sends=[send])
    for l in range(LAYERS):
        worker.save_kv_layer(meta, layer_name(l), worker.layout.tensors[l])
    worker.wait_for_save(meta)
    # One message: Begin, the packed Chunk (header and one payload frame holding every layer), and End.
    assert len(sent) == 1 and len(sent[0]) == 4
    begin, header, end = headers(sent[0])
    assert isinstance(begin, Begin) and isinstance(end, End) and end.num_chunks == 1
    assert isinstance(header, Chunk) and header.num_layers == LAYERS and header.checksum_kind == kind
    assert len(sent[0][2]) == LAYERS * header.payload_bytes
