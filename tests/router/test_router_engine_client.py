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
    (dict(reasoning_parser_kwargs={"x": 1}), "reasoning_parser_kwargs"),
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


def test_every_option_vllms_layer_passes_to_generate_is_honoured_or_refused():
    """A vLLM upgrade that adds a generate() option fails here until the client honours or refuses it."""
    import inspect

    from vllm.engine.protocol import EngineClient

    theirs = set(inspect.signature(EngineClient.generate).parameters)
    ours = set(inspect.signature(ClusterEngineClient.generate).parameters)
    assert theirs == ours
    # tokenization_kwargs: the prompt arrives tokenized; trace_headers: tracing is off (is_tracing_enabled).
    honoured = {"self", "prompt", "sampling_params", "request_id", "prompt_text", "tokenization_kwargs",
                "trace_headers"}
    refused = {"lora_request", "priority", "data_parallel_rank", "session_id", "kv_hints", "reasoning_ended",
               "reasoning_parser_kwargs"}
    assert theirs == honoured | refused


def test_every_sampling_field_crosses_the_wire_as_set():
    """The workers run the client's SamplingParams whole: each public field, set away from its
    default, arrives as sent (structured outputs, logit bias, penalties, logprobs, ...)."""
    import msgspec
    from vllm.sampling_params import StructuredOutputsParams

    sampling = SamplingParams(
        n=1, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.2, temperature=0.7, top_p=0.9,
        top_k=5, min_p=0.05, seed=11, stop=["x"], stop_token_ids=[7], ignore_eos=True, max_tokens=9, min_tokens=2,
        logprobs=2, prompt_logprobs=1, skip_special_tokens=False, spaces_between_special_tokens=False,
        include_stop_str_in_output=True, structured_outputs=StructuredOutputsParams(regex="[ab]+"),
        logit_bias={3: -5.0}, allowed_token_ids=[3, 4, 5], extra_args={"mine": 1}, bad_words=["zz"])
    message = proto.Submit(version=proto.PROTOCOL_VERSION, request_id="r", prompt_token_ids=[1], sampling=sampling)
    decoded = proto.decode(proto.encode(message)).sampling
    for name in SamplingParams.__struct_fields__:
        if not name.startswith("_"):
            assert msgspec.to_builtins(getattr(decoded, name)) == msgspec.to_builtins(getattr(sampling, name)), name


@pytest.mark.parametrize("extra, fragment", [
    ("--port 9000", "--port belongs to the router's own HTTP server"),
    ("--api-key k", "--api-key belongs to the router's own HTTP server"),
    ("--ssl-keyfile k.pem", "--ssl-keyfile belongs"),
    ("--max-model-len 512", "--max-model-len configures the engines"),
    ("--reasoning-parser deepseek_r1", "--reasoning-parser configures the engines"),
    ("--gpu-memory-utilization 0.5", "--gpu-memory-utilization configures the engines"),
])
def test_vllm_args_that_would_reach_no_worker_or_socket_are_refused(tiny_model_dir, extra, fragment):
    from router.vllm_api import vllm_server_args

    with pytest.raises(ValueError, match=fragment):
        vllm_server_args(tiny_model_dir, "tiny", 1024, extra)
    layer_only = vllm_server_args(tiny_model_dir, "tiny", 1024, "--enable-auto-tool-choice --tool-call-parser hermes")
    assert layer_only.tool_call_parser == "hermes" and layer_only.enable_auto_tool_choice
