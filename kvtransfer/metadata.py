"""What the scheduler-side connector tells the worker-side one each step.

vLLM pickles this into the worker process with the SchedulerOutput, so it
holds plain data only: block ids, token counts, ids and addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(slots=True)
class SendSpec:
    """Prefill: ship blocks [first_block, first_block + len(block_ids)) of a request's prompt."""

    request_id: str
    transfer_id: str
    endpoint: str
    prompt_hash: str
    num_tokens: int  # prompt length
    num_blocks: int  # blocks the whole prompt spans
    first_block: int
    block_ids: list[int]  # this engine's physical ids of those blocks
    is_first: bool  # send Begin before the first chunk
    is_last: bool  # send End after this step's chunks
    decode_tp: int = 1  # decode engine's tensor_parallel_size (where each slice of heads goes)
    decode_layers: tuple[int, ...] | None = None  # decode's layers per pipeline stage (None: one stage)


@dataclass(slots=True)
class LoadSpec:
    """Decode: copy blocks [first_block, ...) of a received transfer into block_ids."""

    request_id: str
    transfer_id: str
    prompt_hash: str
    num_tokens: int
    first_block: int  # blocks before this were a local prefix-cache hit
    block_ids: list[int]
    prefill_tp: int = 1  # prefill engine's tensor_parallel_size (how many parts hold our heads)
    prefill_layers: tuple[int, ...] | None = None  # prefill's layers per pipeline stage (None: one stage)
    # The KV had arrived when the scheduler admitted the request: load it before
    # this step's forward pass (vLLM then computes the last prompt token at once).
    sync: bool = False


@dataclass(slots=True)
class DropSpec:
    """Prefill: tell every decode rank that was sent part of this transfer to drop it."""

    endpoint: str
    transfer_id: str
    decode_tp: int = 1
    decode_layers: tuple[int, ...] | None = None


@dataclass(slots=True)
class ForgetSpec:
    """Decode: drop at once whatever the receivers hold of a transfer whose
    handoff the scheduler refused (it names another prompt), instead of
    holding its bytes until the lease ends."""

    transfer_id: str
    prefill_tp: int = 1
    prefill_layers: tuple[int, ...] | None = None


@dataclass
class HexConnectorMetadata(KVConnectorMetadata):
    sends: list[SendSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    drops: list[DropSpec] = field(default_factory=list)
    forgets: list[ForgetSpec] = field(default_factory=list)

