"""ClusterEngineClient without engines: what it refuses, and how output deltas become RequestOutputs.

The runner here replays fixed Output deltas (what a decode worker sends); the
real path, against real engines and `vllm serve`, is test_router_vllm_api.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind, SamplingParams

from engine import control_protocol as proto
from engine.worker_server import to_sampling_params
from router.engine_client import ClusterEngineClient, endpoint_label


def _out(token_ids, text, finished=False, reason=None, logprobs=None, **extra):
    return proto.Output(version=proto.PROTOCOL_VERSION, request_id="r", token_ids=token_ids, text=text,
                        finished=finished, finish_reason=reason, logprobs=logprobs, **extra)


class _Runner:
    """Replays deltas per sequence; sequence i's tokens are offset by 100 * its seed."""

    def __init__(self):
        self.calls = []

    async def stream(self, prompt_ids, sampling, label):
        self.calls.append((list(prompt_ids), sampling.seed, sampling.n, label))
        base = 100 * (sampling.seed or 0)
        lp = [[proto.TokenLogprob(base + 1, -0.5, 1, "a")]] if sampling.logprobs is not None else None
        yield _out([base + 1], "a", logprobs=lp)
        await asyncio.sleep(0)
        lp = [[proto.TokenLogprob(base + 2, -0.25, 1, "b")]] if sampling.logprobs is not None else None
        yield _out([base + 2], "b", finished=True, reason="stop", logprobs=lp, stop_reason="\n")


def _client(runner=None) -> ClusterEngineClient:
    processor = SimpleNamespace(process_inputs=lambda *args, **kwargs: None)
    return ClusterEngineClient(runner or _Runner(), SimpleNamespace(model_config=None), None, processor)


def _generate(client, sampling, request_id="cmpl-1-0", prompt=None, **kwargs):
    prompt = prompt or {"type": "token", "prompt_token_ids": [1, 2, 3], "prompt": "x y z"}

    async def run():
        return [out async for out in client.generate(prompt, sampling, request_id, **kwargs)]

    return asyncio.run(run())


def test_deltas_become_request_outputs_with_logprobs_and_the_finish():
    outputs = _generate(_client(), SamplingParams(max_tokens=2, logprobs=0, output_kind=RequestOutputKind.DELTA))
    assert [o.outputs[0].token_ids for o in outputs] == [[1], [2]]
    assert [o.finished for o in outputs] == [False, True]
    last = outputs[-1].outputs[0]
    assert (last.finish_reason, last.stop_reason) == ("stop", "\n")
    assert last.cumulative_logprob == pytest.approx(-0.75) and last.logprobs[0][2].logprob == -0.25
    assert outputs[0].prompt_token_ids == [1, 2, 3] and outputs[0].prompt == "x y z"


def test_final_only_yields_once_with_every_sequence_and_n_children_seeded_as_vllm():
    runner = _Runner()
    outputs = _generate(_client(runner), SamplingParams(max_tokens=2, n=3, seed=5,
                                                        output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(outputs) == 1 and outputs[0].finished
    by_index = {o.index: o for o in outputs[0].outputs}
    assert {i: o.token_ids for i, o in by_index.items()} == {0: [501, 502], 1: [601, 602], 2: [701, 702]}
    assert sorted((seed, n) for _, seed, n, _ in runner.calls) == [(5, 1), (6, 1), (7, 1)]
    assert {label for *_, label in runner.calls} == {"completions"}


def test_cumulative_outputs_grow():
    outputs = _generate(_client(), SamplingParams(max_tokens=2, output_kind=RequestOutputKind.CUMULATIVE))
    assert [o.outputs[0].text for o in outputs] == ["a", "ab"]


def test_a_worker_error_reaches_vllms_layer_as_a_503():
    class Failing(_Runner):
        async def stream(self, prompt_ids, sampling, label):
            yield _out([], "", finished=True, error="engine died")

    from vllm.exceptions import GracefulHTTPError

    with pytest.raises(GracefulHTTPError, match="engine died") as caught:
        _generate(_client(Failing()), SamplingParams(max_tokens=2))
    assert caught.value.http_status == 503


@pytest.mark.parametrize("kwargs, name", [
    (dict(lora_request=object()), "lora_request"),
    (dict(priority=2), "priority"),
    (dict(data_parallel_rank=1), "data_parallel_rank"),
    (dict(session_id="s"), "session_id"),
    (dict(reasoning_ended=True), "reasoning_ended"),
    (dict(prompt={"type": "token", "prompt_token_ids": [1], "cache_salt": "t"}), "cache_salt"),
    (dict(prompt={"type": "embeds", "prompt_embeds": None}), "prompt"),
])
def test_what_the_cluster_cannot_do_is_refused_by_name(kwargs, name):
    runner = _Runner()
    with pytest.raises(VLLMValidationError, match=name):
        _generate(_client(runner), SamplingParams(max_tokens=2), **kwargs)
    assert not runner.calls


def test_client_kv_transfer_params_are_refused_and_other_extra_args_reach_the_engine():
    with pytest.raises(VLLMValidationError, match="kv_transfer_params"):
        _generate(_client(), SamplingParams(max_tokens=2, extra_args={"kv_transfer_params": {"x": 1}}))
    on_worker = to_sampling_params(SamplingParams(max_tokens=2, extra_args={"my_processor": 3}), {"send": 1})
    assert on_worker.extra_args == {"my_processor": 3, "kv_transfer_params": {"send": 1}}
    assert on_worker.output_kind is RequestOutputKind.DELTA


def test_endpoint_labels_come_from_vllms_request_ids():
    assert [endpoint_label(r) for r in ("cmpl-abc-0", "chatcmpl-abc", "resp_abc", "x")] == [
        "completions", "chat", "responses", "other"]
