"""The prefill request: what the router asks of a prefill worker for one client request."""

from __future__ import annotations

from typing import Any

from engine.control_protocol import SamplingSpec
from engine.worker_spec import WorkerSpec

# The prefill's one sampled token is discarded (decode samples the first token
# itself), so it is greedy, ignores EOS and has no stop strings: nothing about
# it may stop the KV from being handed over.
PREFILL_SAMPLING = SamplingSpec(max_tokens=1, temperature=0.0, ignore_eos=True)


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
