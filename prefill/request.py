"""The prefill request: what the router asks of a prefill worker for one client request."""

from __future__ import annotations

from typing import Any

from vllm.sampling_params import SamplingParams

from engine.worker_spec import WorkerSpec

# The prefill's one sampled token is discarded (decode samples the first token
# itself), so it is greedy, ignores EOS and has no stop strings: nothing about
# it may stop the KV from being handed over. Of the client's options it keeps
# the one only the prompt's computation can answer: prompt logprobs.
PREFILL_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def prefill_sampling(client: SamplingParams) -> SamplingParams:
    """The prefill request's sampling for a client request with these options."""
    if client.prompt_logprobs is None:
        return PREFILL_SAMPLING
    with_prompt_logprobs = PREFILL_SAMPLING.clone()
    with_prompt_logprobs.prompt_logprobs = client.prompt_logprobs
    return with_prompt_logprobs


def prefill_kv_params(decode: WorkerSpec, transfer_id: str, kv_connector: str,
                      skip_blocks: int = 0) -> dict[str, Any] | None:
    """What the prefill request carries so its connector ships the KV to `decode`
    (split to decode's TP and pipeline stages), past the `skip_blocks` first
    blocks decode already holds; None with no connector."""
    if kv_connector == "none":
        return None
    from kvtransfer import prefill_params

    return prefill_params(decode_endpoint=decode.kv_endpoint, transfer_id=transfer_id,
                          decode_tp=decode.tensor_parallel_size, decode_layers=decode.layers_per_stage,
                          skip_blocks=skip_blocks)
