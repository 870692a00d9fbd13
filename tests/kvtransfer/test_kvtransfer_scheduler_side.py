"""Scheduler-side bookkeeping with small fakes of vLLM's objects: which blocks go when."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from kvtransfer.handoff import DecodeHandoff, prefill_params, prompt_hash
from kvtransfer.metadata import DropSpec
from kvtransfer.scheduler_side import SchedulerSide

BLOCK = 4


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict | None
    num_computed_tokens: int = 0


@dataclass
class FakeBlock:
    block_id: int
    block_hash: object = None
    is_null: bool = False


@dataclass
class FakeBlocks:
    blocks: tuple = field(default_factory=tuple)

    def get_block_ids(self):
        return ([b.block_id for b in self.blocks[0]],)


class FakeManager:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self, request_id):
        return (self.ids[request_id],)


def handoff(prompt: list[int], transfer_id: str = "t", **extra) -> dict:
    """The kv_transfer_params prefill returns for this prompt (plus `extra` keys)."""
    return DecodeHandoff(transfer_id, len(prompt), prompt_hash(prompt)).to_params() | extra


def step(side: SchedulerSide, request: FakeRequest, scheduled: int):
    meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={request.request_id: scheduled}))
    request.num_computed_tokens += scheduled
    return meta


def producer(prompt_len: int, physical=(10, 11, 12, 13)):
    side = SchedulerSide(BLOCK)
    side.kv_cache_manager = FakeManager({"r": list(physical)})
    request = FakeRequest("r", list(range(prompt_len)), prefill_params("ipc:///tmp/d", transfer_id="t"))
    side.update_state_after_alloc(request, FakeBlocks(), 0)
    return side, request


def test_chunked_prefill_sends_each_block_once_in_order():
    side, request = producer(10)
    first = step(side, request, 6)  # tokens 0..5: block 0 complete
    second = step(side, request, 4)  # tokens 6..9: the rest, partial last block included
    (a,), (b,) = first.sends, second.sends
    assert (a.first_block, a.block_ids, a.is_first, a.is_last) == (0, [10], True, False)
    assert (b.first_block, b.block_ids, b.is_first, b.is_last) == (1, [11, 12], False, True)
    assert a.num_blocks == b.num_blocks == 3 and a.prompt_hash == prompt_hash(request.prompt_token_ids)
    done, params = side.request_finished(request, [10, 11, 12])
    assert done is False and params["do_remote_prefill"] and params["transfer_id"] == "t"
    assert params["num_prompt_tokens"] == 10 and params["decode_endpoint"] == "ipc:///tmp/d"


def test_prefix_cache_hit_on_prefill_still_sends_cached_blocks():
    side, request = producer(10)
    request.num_computed_tokens = 8  # two blocks came from the local prefix cache
    (spec,) = step(side, request, 2).sends
    assert (spec.first_block, spec.block_ids, spec.is_first, spec.is_last) == (0, [10, 11, 12], True, True)


def test_step_without_a_finished_block_sends_nothing():
    side, request = producer(10)
    assert step(side, request, 3).sends == []
    (spec,) = step(side, request, 7).sends
    assert spec.is_first and spec.is_last and spec.block_ids == [10, 11, 12]


def test_request_ending_before_its_prompt_aborts_the_transfer():
    side, request = producer(10)
    step(side, request, 6)
    assert side.request_finished(request, [10, 11]) == (False, None)
    assert side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).drops == [DropSpec("ipc:///tmp/d", "t", 1)]


def test_decode_loads_only_blocks_past_the_local_hit_and_only_once():
    side = SchedulerSide(BLOCK)
    prompt = list(range(10))
    request = FakeRequest("d", prompt, handoff(prompt))
    assert side.get_num_new_matched_tokens(request, 4) == (6, True)
    blocks = FakeBlocks(([FakeBlock(20, block_hash="h0"), FakeBlock(21), FakeBlock(22), FakeBlock(23)],))
    side.update_state_after_alloc(request, blocks, 6)
    (load,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert (load.first_block, load.block_ids, load.num_tokens) == (1, [21, 22], 10)
    assert load.prompt_hash == prompt_hash(prompt)
    # After a failed load vLLM asks again from zero: now it must recompute.
    assert side.get_num_new_matched_tokens(request, 0) == (0, False)


def test_requests_without_params_are_ignored():
    side = SchedulerSide(BLOCK)
    request = FakeRequest("x", [1, 2, 3], None)
    assert side.get_num_new_matched_tokens(request, 0) == (0, False)
    side.update_state_after_alloc(request, FakeBlocks(), 0)
    meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"x": 3}))
    assert meta.sends == [] and meta.loads == [] and side.request_finished(request, []) == (False, None)


def test_decode_tp_travels_to_the_worker():
    side = SchedulerSide(BLOCK)
    side.kv_cache_manager = FakeManager({"r": [10, 11]})
    request = FakeRequest("r", list(range(8)), prefill_params("ipc:///tmp/d", transfer_id="t", decode_tp=4))
    side.update_state_after_alloc(request, FakeBlocks(), 0)
    (send,) = step(side, request, 8).sends
    assert send.decode_tp == 4 and send.is_last


def test_pipeline_splits_travel_both_ways():
    # Prefill in two stages of 1 + 3 layers, decode in stages of 3 + 1.
    side = SchedulerSide(BLOCK, layers_per_stage=(1, 3))
    side.kv_cache_manager = FakeManager({"r": [10, 11]})
    request = FakeRequest("r", list(range(8)), prefill_params("ipc:///tmp/d", transfer_id="t", decode_layers=[3, 1]))
    side.update_state_after_alloc(request, FakeBlocks(), 0)
    (send,) = step(side, request, 8).sends
    assert send.decode_layers == (3, 1)
    _, handoff = side.request_finished(request, [10, 11])
    assert handoff["prefill_layers"] == [1, 3]

    decode = SchedulerSide(BLOCK, layers_per_stage=(3, 1))
    incoming = FakeRequest("d", list(range(8)), dict(handoff))
    assert decode.get_num_new_matched_tokens(incoming, 0) == (8, True)
    decode.update_state_after_alloc(incoming, FakeBlocks(([FakeBlock(5), FakeBlock(6)],)), 8)
    (load,) = decode.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert load.prefill_layers == (1, 3)


def test_a_split_that_does_not_cover_the_model_is_refused_at_once():
    side = SchedulerSide(BLOCK, layers_per_stage=(2, 2))
    side.kv_cache_manager = FakeManager({"r": [10, 11]})
    params = prefill_params("ipc:///tmp/d", transfer_id="t", decode_layers=[2, 3])  # 5 layers, model has 4
    request = FakeRequest("r", list(range(8)), params)
    side.update_state_after_alloc(request, FakeBlocks(), 0)
    assert step(side, request, 8).sends == []  # nothing sent ...
    assert side.request_finished(request, [10, 11]) == (False, None)  # ... and decode recomputes
    # Decode given a prefill split it cannot match recomputes now instead of waiting.
    for bad in ([2, 3], [4, 0], "2,2", [2.0, 2]):
        incoming = FakeRequest("d", list(range(8)), handoff(list(range(8)), prefill_layers=bad))
        assert side.get_num_new_matched_tokens(incoming, 0) == (0, False)


def test_prefill_params_check_the_decode_split():
    import pytest

    assert "decode_layers" not in prefill_params("ipc:///tmp/d", decode_layers=[32])  # one stage: nothing to say
    with pytest.raises(ValueError, match="decode_layers"):
        prefill_params("ipc:///tmp/d", decode_layers=[16, 0])


def test_kv_already_arrived_loads_synchronously_all_but_the_last_token(tmp_path):
    """The receiver marked the transfer complete: the request is admitted with a
    synchronous load of tokens [local hit, n - 1), and the step computes the last one."""
    from kvtransfer.arrivals import ArrivalMarks
    from kvtransfer.endpoints import rank_endpoint

    endpoint = f"ipc://{tmp_path}/decode.sock"
    marks = [ArrivalMarks(rank_endpoint(endpoint, rank)) for rank in range(2)]
    side = SchedulerSide(BLOCK, tp_size=2, listen_endpoint=endpoint)
    prompt = list(range(10))

    def offer(request_id: str, **extra) -> tuple[int, bool]:
        request = FakeRequest(request_id, prompt, handoff(prompt, **extra))
        return side.get_num_new_matched_tokens(request, 4), request

    assert offer("a")[0] == (6, True)  # not arrived anywhere: asynchronous
    marks[0].mark("t")
    assert offer("b")[0] == (6, True)  # rank 1 still waits for its part
    marks[1].mark("t")
    result, request = offer("c")
    assert result == (5, False)
    # A synchronous load is cached at allocation: every block has a hash, local or loaded.
    blocks = FakeBlocks(([FakeBlock(20 + i, block_hash=f"h{i}") for i in range(3)],))
    side.update_state_after_alloc(request, blocks, 5)
    (load,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert (load.sync, load.first_block, load.block_ids) == (True, 1, [21, 22])
    # Layouts where a rank assembles several parts stay asynchronous.
    assert offer("d", prefill_tp=4)[0] == (6, True)
    assert offer("e", prefill_layers=[2, 2])[0] == (6, True)
    assert offer("f", prefill_tp=1)[0] == (5, False)
    # Nothing left to load but the last token: nothing to gain, asynchronous as before.
    assert side.get_num_new_matched_tokens(FakeRequest("g", prompt[:9], handoff(prompt[:9])), 8) == (1, True)
    marks[0].unmark("t")
    assert offer("h")[0] == (6, True)
    # Without a listen endpoint (sync_load=False) every load is asynchronous.
    assert SchedulerSide(BLOCK, tp_size=2).get_num_new_matched_tokens(
        FakeRequest("i", prompt, handoff(prompt)), 4) == (6, True)
    for m in marks:
        m.clear()


def test_arrival_marks_are_named_by_hash_and_cleared_by_a_new_receiver(tmp_path):
    from kvtransfer.arrivals import ArrivalMarks, has_arrived

    endpoint = f"ipc://{tmp_path}/d.sock"
    marks = ArrivalMarks(endpoint)
    marks.mark("../../etc/passwd")  # ids come off the wire
    assert has_arrived(endpoint, "../../etc/passwd") and not has_arrived(endpoint, "other")
    assert [p.parent for p in marks.dir.iterdir()] == [marks.dir]
    assert not has_arrived(f"ipc://{tmp_path}/other.sock", "../../etc/passwd")
    restarted = ArrivalMarks(endpoint)  # a restarted receiver on the same endpoint: old marks are stale
    assert not has_arrived(endpoint, "../../etc/passwd")
    restarted.mark("t")
    restarted.clear()  # closing: nothing left behind
    assert not restarted.dir.exists()
