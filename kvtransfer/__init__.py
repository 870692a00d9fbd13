"""kvtransfer: KV-cache transfer from prefill to decode over ZeroMQ, as a vLLM KV connector.

The router/worker contract lives in `kvtransfer.handoff`; the wire format in
`kvtransfer.protocol`; the vLLM connector in `kvtransfer.connector` (imported
by vLLM from `kv_connector_module_path`, never at package import).
"""

from kvtransfer.handoff import (
    connector_config,
    decode_params_from,
    new_transfer_id,
    prefill_params,
    prompt_hash,
    stats_path,
)
from kvtransfer.endpoints import remove_receiver_files
from kvtransfer.stats import read_stats

__all__ = [
    "connector_config",
    "decode_params_from",
    "new_transfer_id",
    "prefill_params",
    "prompt_hash",
    "read_stats",
    "remove_receiver_files",
    "stats_path",
]
