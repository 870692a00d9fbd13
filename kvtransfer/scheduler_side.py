"""Scheduler-side connector logic (runs in vLLM's EngineCore process; sees no tensors).

Prefill (producer): a request whose kv_transfer_params say do_remote_decode is
tracked from its admission; each step the scheduler computes some of its
prompt, this side lists the prompt blocks that became complete in that step
(all remaining ones on the last step) for the worker to ship. When the request
finishes, `request_finished` returns the params decode needs. The worker has
copied the blocks out during the forward pass, so vLLM may free them at once.

Decode (consumer): a request whose params say do_remote_prefill reports its
prompt, beyond any local prefix-cache hit, as externally computed. If the KV
has not arrived yet it is loaded asynchronously: vLLM parks the request in
WAITING_FOR_REMOTE_KVS with blocks allocated until the worker has filled
them, and computes the last prompt token a step later. If it has arrived
(kvtransfer.arrivals), all but the last prompt token are loaded
synchronously, before the forward pass of the step that admits the request,
which then yields the first token. Either way this side tells the worker
which blocks to fill from which transfer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtransfer import protocol
from kvtransfer.arrivals import has_arrived
from kvtransfer.handoff import prompt_hash, rank_endpoint
from kvtransfer.metadata import DropSpec, HexConnectorMetadata, LoadSpec, SendSpec
from kvtransfer.reshard import layer_partition

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sending:
    request: "Request"
    transfer_id: str
    endpoint: str
    prompt_hash: str
    num_tokens: int
    decode_tp: int = 1
    decode_layers: tuple[int, ...] | None = None
    blocks_sent: int = 0


class SchedulerSide:
    def __init__(
        self,
        block_size: int,
        tp_size: int = 1,
        layers_per_stage: tuple[int, ...] | None = None,
        *,
        listen_endpoint: str | None = None,
    ) -> None:
        self.block_size = block_size
        # Decode: where this engine's receivers listen, to see which transfers
        # arrived (kvtransfer.arrivals); None: every load is asynchronous.
        self.listen_endpoint = listen_endpoint
        self._local_tokens: dict[str, int] = {}  # request -> local prefix-cache hit it was offered
        self._sync: set[str] = set()  # requests admitted with a synchronous load
        # Told to decode in the handoff: how the KV heads (TP) and layers (PP)
        # were split, so each decode rank knows which parts to assemble.
        self.tp_size = tp_size
        self.layers_per_stage = layers_per_stage  # None: layer count unknown (checks skipped), one stage
        self.kv_cache_manager: KVCacheManager | None = None
        self._sending: dict[str, _Sending] = {}
        self._sent: dict[str, _Sending] = {}  # whole prompt shipped; awaiting request_finished
        self._loads: list[LoadSpec] = []
        self._drops: list[DropSpec] = []

    @property
    def total_layers(self) -> int | None:
        return sum(self.layers_per_stage) if self.layers_per_stage else None

    def _other_partition(self, params: dict, key: str) -> tuple[tuple[int, ...] | None, str | None]:
        """The other engine's layers per stage from kv_transfer_params (client-supplied, so checked)."""
        value = params.get(key)
        if value is None:
            return None, None
        try:
            return layer_partition(value, self.total_layers, key), None
        except ValueError as exc:
            return None, str(exc)

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- decode --------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or not params.get("transfer_id"):
            return 0, False
        _, error = self._other_partition(params, "prefill_layers")
        if error:
            # No part could be matched to our layers: recompute now rather than time out.
            logger.warning("kvtransfer: request %s recomputes its prompt: %s", request.request_id, error)
            params["do_remote_prefill"] = False
            return 0, False
        num_prompt = len(request.prompt_token_ids or ())
        count = num_prompt - num_computed_tokens
        if count <= 0:
            return 0, False
        self._local_tokens[request.request_id] = num_computed_tokens
        if num_prompt - 1 > num_computed_tokens and self._arrived(params):
            # Load now, before this step's forward pass, which computes the last
            # prompt token: the first token comes out of this very step.
            self._sync.add(request.request_id)
            return num_prompt - 1 - num_computed_tokens, False
        self._sync.discard(request.request_id)
        return count, True

    def _arrived(self, params: dict) -> bool:
        """Whether every rank of this engine holds its part of the transfer.
        Only where each rank loads one part under the plain transfer id (one
        prefill stage, and prefill TP dividing ours); other layouts load
        asynchronously."""
        if self.listen_endpoint is None or (self.layers_per_stage and len(self.layers_per_stage) > 1):
            return False
        prefill_layers = params.get("prefill_layers")
        prefill_tp = params.get("prefill_tp", 1)
        if (prefill_layers and len(prefill_layers) > 1) or not isinstance(prefill_tp, int) or prefill_tp < 1:
            return False
        if prefill_tp > self.tp_size or self.tp_size % prefill_tp:
            return False
        transfer_id = str(params["transfer_id"])
        return all(has_arrived(rank_endpoint(self.listen_endpoint, rank), transfer_id) for rank in range(self.tp_size))

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params:
            return
        if params.get("do_remote_prefill"):
            # One load per request: after a failed load vLLM asks again with
            # num_computed_tokens=0, and must then get 0 (recompute).
            params["do_remote_prefill"] = False
            # The block-aligned local hit vLLM offered in get_num_new_matched_tokens
            # (the only way num_external_tokens > 0). Block hashes cannot tell it:
            # with a synchronous load vLLM caches the loaded blocks at allocation.
            local_tokens = self._local_tokens.pop(request.request_id, 0)
            is_sync = request.request_id in self._sync
            self._sync.discard(request.request_id)
            if num_external_tokens <= 0:
                return
            local_hit_blocks = local_tokens // self.block_size
            prompt = request.prompt_token_ids or ()
            block_ids = blocks.get_block_ids()[0][local_hit_blocks : self._num_blocks(len(prompt))]
            self._loads.append(
                LoadSpec(
                    request_id=request.request_id,
                    transfer_id=str(params["transfer_id"]),
                    prompt_hash=prompt_hash(prompt),
                    num_tokens=len(prompt),
                    first_block=local_hit_blocks,
                    block_ids=list(block_ids),
                    prefill_tp=_positive_int(params.get("prefill_tp", 1)),
                    prefill_layers=self._other_partition(params, "prefill_layers")[0],
                    sync=is_sync,
                )
            )
        elif params.get("do_remote_decode") and request.request_id not in self._sending and request.request_id not in self._sent:
            # (A request preempted after its prompt went out is not sent twice.)
            endpoint, transfer_id = params.get("decode_endpoint"), params.get("transfer_id")
            if not endpoint or not transfer_id:
                logger.warning("kvtransfer: request %s has do_remote_decode but no decode_endpoint/transfer_id; not sending", request.request_id)
                return
            decode_layers, error = self._other_partition(params, "decode_layers")
            if error:
                # Without a handoff the router's decode request recomputes at once.
                logger.warning("kvtransfer: request %s: not sending its KV: %s", request.request_id, error)
                return
            decode_tp = _positive_int(params.get("decode_tp", 1))
            prompt = request.prompt_token_ids or ()
            self._sending[request.request_id] = _Sending(
                request, str(transfer_id), str(endpoint), prompt_hash(prompt), len(prompt), decode_tp, decode_layers
            )

    # -- prefill -------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> HexConnectorMetadata:
        meta = HexConnectorMetadata(loads=self._loads, drops=self._drops)
        self._loads, self._drops = [], []
        for request_id, state in list(self._sending.items()):
            num_scheduled = scheduler_output.num_scheduled_tokens.get(request_id, 0)
            if not num_scheduled:
                continue
            # The connector meta is built before vLLM advances num_computed_tokens.
            end = min(state.request.num_computed_tokens + num_scheduled, state.num_tokens)
            is_last = end >= state.num_tokens
            upto = self._num_blocks(state.num_tokens) if is_last else end // self.block_size
            if upto <= state.blocks_sent:
                continue
            assert self.kv_cache_manager is not None
            all_ids = self.kv_cache_manager.get_block_ids(request_id)[0]
            meta.sends.append(
                SendSpec(
                    request_id=request_id,
                    transfer_id=state.transfer_id,
                    endpoint=state.endpoint,
                    prompt_hash=state.prompt_hash,
                    num_tokens=state.num_tokens,
                    num_blocks=self._num_blocks(state.num_tokens),
                    first_block=state.blocks_sent,
                    block_ids=list(all_ids[state.blocks_sent : upto]),
                    is_first=state.blocks_sent == 0,
                    is_last=is_last,
                    decode_tp=state.decode_tp,
                    decode_layers=state.decode_layers,
                )
            )
            state.blocks_sent = upto
            if is_last:
                self._sent[request_id] = self._sending.pop(request_id)
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._local_tokens.pop(request.request_id, None)  # offered a load, never admitted
        self._sync.discard(request.request_id)
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return False, None
        unfinished = self._sending.pop(request.request_id, None)
        if unfinished is not None:
            # Finished (aborted) before its whole prompt was computed: nothing to decode from.
            if unfinished.blocks_sent:
                self._drops.append(
                    DropSpec(unfinished.endpoint, unfinished.transfer_id, unfinished.decode_tp, unfinished.decode_layers)
                )
            return False, None
        state = self._sent.pop(request.request_id, None)
        if state is None:
            return False, None
        handoff = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": state.transfer_id,
            "decode_endpoint": state.endpoint,
            "num_prompt_tokens": state.num_tokens,
            "prompt_hash": state.prompt_hash,
            "prefill_tp": self.tp_size,
            "kv_protocol_version": protocol.PROTOCOL_VERSION,
        }
        if self.layers_per_stage and len(self.layers_per_stage) > 1:
            handoff["prefill_layers"] = list(self.layers_per_stage)
        return False, handoff


def _positive_int(value: Any) -> int:
    """A TP size from kv_transfer_params (client-supplied, so checked): 1 if it is not a positive int."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    logger.warning("kvtransfer: ignoring tensor-parallel size %r in kv_transfer_params; using 1", value)
    return 1
