"""The typed handoff, and decode's checks of it: version and prompt, refused with a counted reason."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from kvtransfer.arrivals import ArrivalMarks
from kvtransfer.endpoints import rank_endpoint
from kvtransfer.handoff import DecodeHandoff, HandoffRefused, PrefillParams, prefill_params, prompt_hash
from kvtransfer.metadata import ForgetSpec
from kvtransfer.protocol import PROTOCOL_VERSION
from kvtransfer.scheduler_side import SchedulerSide
from kvtransfer.stats import Stats, read_stats, scheduler_stats_path
from test_kvtransfer_scheduler_side import BLOCK, FakeBlock, FakeBlocks, FakeRequest, handoff

PROMPT = list(range(10))


def blocks(n: int = 3) -> FakeBlocks:
    return FakeBlocks(([FakeBlock(20 + i) for i in range(n)],))


def loads(side: SchedulerSide) -> list:
    return side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads


def test_handoff_round_trips_through_its_params():
    sent = DecodeHandoff("t", 10, prompt_hash(PROMPT), prefill_tp=2, prefill_layers=(1, 3), decode_endpoint="ipc:///tmp/d")
    params = sent.to_params()
    assert params["do_remote_prefill"] and params["kv_protocol_version"] == PROTOCOL_VERSION
    assert params["prefill_layers"] == [1, 3] and params["num_prompt_tokens"] == 10
    assert DecodeHandoff.from_params(params, total_layers=4) == sent
    assert "prefill_layers" not in DecodeHandoff("t", 10, "h", prefill_layers=(4,)).to_params()  # one stage: nothing to say
    target = PrefillParams("ipc:///tmp/d", "t", decode_tp=2, decode_layers=(3, 1))
    assert PrefillParams.from_params(target.to_params(), total_layers=4) == target
    assert prefill_params("ipc:///tmp/d", transfer_id="t", decode_tp=2, decode_layers=[3, 1]) == target.to_params()


@pytest.mark.parametrize(
    "change, counter, text",
    [
        ({"kv_protocol_version": PROTOCOL_VERSION + 1}, "transfers_refused_version", "kv_protocol_version"),
        ({"kv_protocol_version": None}, "transfers_refused_version", "kv_protocol_version"),
        ({"prompt_hash": None}, "transfers_refused_prompt_hash", "names no prompt"),
        ({"num_prompt_tokens": 0}, "transfers_refused_prompt_hash", "names no prompt"),
        ({"transfer_id": ""}, None, "transfer_id"),
        ({"prefill_tp": 0}, None, "prefill_tp"),
        ({"prefill_layers": [2, 3]}, None, "prefill_layers"),
    ],
)
def test_a_malformed_handoff_is_refused_with_its_reason(change, counter, text):
    with pytest.raises(HandoffRefused, match=text) as refused:
        DecodeHandoff.from_params(handoff(PROMPT) | change, total_layers=4)
    assert refused.value.counter == counter


def test_a_handoff_for_another_prompt_is_refused():
    sent = DecodeHandoff.from_params(handoff(PROMPT))
    sent.check_prompt(PROMPT)
    for other in (PROMPT[:9], PROMPT[:9] + [99], [*PROMPT, 10]):
        with pytest.raises(HandoffRefused, match="another prompt") as refused:
            sent.check_prompt(other)
        assert refused.value.counter == "transfers_refused_prompt_hash"


def refusal(tmp_path, params: dict, prompt=PROMPT):
    """Offer, admit (vLLM's next call) and read the counters, as decode's scheduler sees a handoff:
    (answer, the step's metadata, counters)."""
    path = tmp_path / "stats.json"
    side = SchedulerSide(BLOCK, stats=Stats(scheduler_stats_path(path)))
    request = FakeRequest("d", prompt, params)
    answer = side.get_num_new_matched_tokens(request, 0)
    side.update_state_after_alloc(request, blocks(), 0)
    return answer, side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})), read_stats(path)


def test_decode_refuses_another_protocol_version_and_counts_it(tmp_path):
    answer, meta, counters = refusal(tmp_path, handoff(PROMPT, kv_protocol_version=PROTOCOL_VERSION + 1))
    assert answer == (0, False) and meta.loads == []  # recompute at once, nothing to load
    assert counters["transfers_refused_version"] == 1 and counters["transfers_refused_prompt_hash"] == 0
    assert counters["transfers_loaded_failed"] == 1  # a failed load, by reason (as load_timeouts)
    assert meta.forgets == []  # another version's sender is refused by the receiver at its first frame


def test_decode_refuses_a_handoff_for_another_prompt_and_counts_it(tmp_path):
    answer, meta, counters = refusal(tmp_path, handoff(PROMPT, prefill_tp=2), prompt=[*PROMPT[:9], 99])  # other tokens
    assert answer == (0, False) and meta.loads == []
    assert counters["transfers_refused_prompt_hash"] == 1 and counters["transfers_refused_version"] == 0
    assert counters["transfers_loaded_failed"] == 1
    assert meta.forgets == [ForgetSpec("t", 2, None)]  # its bytes go at once, every part of them
    answer, _, counters = refusal(tmp_path / "other-length", handoff(PROMPT), prompt=PROMPT[:9])
    assert answer == (0, False) and counters["transfers_refused_prompt_hash"] == 1


def test_a_good_handoff_counts_no_refusal(tmp_path):
    path = tmp_path / "stats.json"
    side = SchedulerSide(BLOCK, stats=Stats(scheduler_stats_path(path)))
    request = FakeRequest("d", PROMPT, handoff(PROMPT))
    assert side.get_num_new_matched_tokens(request, 0) == (10, True)
    side.update_state_after_alloc(request, blocks(), 10)
    (load,) = loads(side)
    assert (load.transfer_id, load.prompt_hash, load.num_tokens, load.sync) == ("t", prompt_hash(PROMPT), 10, False)
    counters = read_stats(path)
    assert counters["transfers_refused_version"] == counters["transfers_refused_prompt_hash"] == 0


def state_of(side: SchedulerSide, request: FakeRequest) -> tuple:
    """Everything the request and the connector hold (the connector's counters by value)."""
    connector = {k: v for k, v in vars(side).items() if k != "stats"}
    return copy.deepcopy(vars(request)), copy.deepcopy(connector), side.stats.snapshot()


@pytest.mark.parametrize(
    "params",
    [
        handoff(PROMPT),  # a load (asynchronous, or synchronous once marked)
        handoff(PROMPT, kv_protocol_version=0),  # refused: version
        handoff(PROMPT[:5]),  # refused: another prompt
        handoff(PROMPT, prefill_layers=[2, 3]),  # refused: split does not cover the model
        None,
        {"do_remote_decode": True, "decode_endpoint": "ipc:///tmp/d", "transfer_id": "t"},  # a prefill request
    ],
)
def test_get_num_new_matched_tokens_twice_changes_nothing(tmp_path, params):
    """vLLM documents it side-effect free and may ask several times before it admits a request."""
    endpoint = f"ipc://{tmp_path}/decode.sock"
    marks = ArrivalMarks(rank_endpoint(endpoint, 0))
    side = SchedulerSide(BLOCK, layers_per_stage=(4,), listen_endpoint=endpoint)
    request = FakeRequest("d", PROMPT, params)
    before = state_of(side, request)
    first = side.get_num_new_matched_tokens(request, 4)
    assert state_of(side, request) == before
    assert side.get_num_new_matched_tokens(request, 4) == first
    assert state_of(side, request) == before
    marks.mark("t")  # arrived between two questions: the answer may change, the state does not
    side.get_num_new_matched_tokens(request, 4)
    side.get_num_new_matched_tokens(request, 4)
    assert state_of(side, request) == before
    marks.clear()


def test_the_load_follows_the_answer_vllm_took_even_if_marks_changed_since(tmp_path):
    """The arrival mark may appear or vanish between vLLM's question and the
    allocation; what is loaded, and how, follows the answer vLLM acted on
    (read back from num_external_tokens, never from state kept in between)."""
    endpoint = f"ipc://{tmp_path}/decode.sock"
    marks = ArrivalMarks(endpoint)
    side = SchedulerSide(BLOCK, listen_endpoint=endpoint)
    for local, arrived_before, arrived_after in [(0, False, True), (4, False, True), (0, True, False), (8, True, False), (4, True, True)]:
        (marks.mark if arrived_before else marks.unmark)("t")
        request = FakeRequest(f"r{local}{arrived_before}", PROMPT, handoff(PROMPT))
        count, load_async = side.get_num_new_matched_tokens(request, local)
        assert (count, load_async) == ((9 - local, False) if arrived_before else (10 - local, True))
        (marks.mark if arrived_after else marks.unmark)("t")
        side.update_state_after_alloc(request, blocks(), count)
        (load,) = loads(side)
        assert load.sync == arrived_before and load.first_block == local // BLOCK
        assert load.block_ids == [20 + i for i in range(local // BLOCK, 3)]
    marks.clear()


def test_one_token_blocks_always_load_asynchronously(tmp_path):
    endpoint = f"ipc://{tmp_path}/decode.sock"
    marks = ArrivalMarks(endpoint)
    marks.mark("t")
    side = SchedulerSide(1, listen_endpoint=endpoint)
    assert side.get_num_new_matched_tokens(FakeRequest("d", PROMPT, handoff(PROMPT)), 3) == (7, True)
    marks.clear()


def test_a_refused_transfer_is_dropped_from_every_part_the_rank_holds():
    from kvtransfer.cache_layout import CacheLayout
    from kvtransfer.load_path import LoadPath
    from kvtransfer.options import ConnectorOptions
    from kvtransfer.reshard import RankShape

    import torch

    forgotten = []
    receiver = type("Receiver", (), {"forget": lambda self, tid, why: forgotten.append(tid)})()
    layout = CacheLayout({"layer.0": torch.zeros(4, 2, 4, 8)}, 4, 2)
    path = LoadPath(ConnectorOptions(), layout, RankShape(num_heads=2), receiver, Stats())
    path.forget([ForgetSpec("t", prefill_tp=2), ForgetSpec("u")])
    assert forgotten == ["t#h0", "t#h1", "u"]
