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

from kvtransfer.arrivals import has_arrived
from kvtransfer.endpoints import rank_endpoint
from kvtransfer.handoff import DecodeHandoff, HandoffRefused, PrefillParams, prompt_hash
from kvtransfer.metadata import DropSpec, ForgetSpec, HexConnectorMetadata, LoadSpec, SendSpec
from kvtransfer.stats import Stats

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
    blocks_sent: int = 0  # starts past the blocks decode already holds (skip_blocks)
    begun: bool = False


class SchedulerSide:
    def __init__(
        self,
        block_size: int,
        tp_size: int = 1,
        layers_per_stage: tuple[int, ...] | None = None,
        *,
        listen_endpoint: str | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.block_size = block_size
        # Decode: where this engine's receivers listen, to see which transfers
        # arrived (kvtransfer.arrivals); None: every load is asynchronous.
        # With one-token blocks update_state_after_alloc could not tell a
        # synchronous answer from an asynchronous one (see _load_spec), so
        # those load asynchronously.
        self.listen_endpoint = listen_endpoint if block_size > 1 else None
        # Told to decode in the handoff: how the KV heads (TP) and layers (PP)
        # were split, so each decode rank knows which parts to assemble.
        self.tp_size = tp_size
        self.layers_per_stage = layers_per_stage  # None: layer count unknown (checks skipped), one stage
        self.stats = stats or Stats()  # handoffs refused here, before any worker rank sees the request
        self.kv_cache_manager: KVCacheManager | None = None
        self._sending: dict[str, _Sending] = {}
        self._sent: dict[str, _Sending] = {}  # whole prompt shipped; awaiting request_finished
        self._loads: list[LoadSpec] = []
        self._drops: list[DropSpec] = []
        self._forgets: list[ForgetSpec] = []

    @property
    def total_layers(self) -> int | None:
        return sum(self.layers_per_stage) if self.layers_per_stage else None

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- decode --------------------------------------------------------------------------

    def _handoff(self, request: "Request") -> DecodeHandoff | HandoffRefused | None:
        """The request's checked handoff, why it is refused, or None if it has
        none (or already loaded once). Reads, never writes: vLLM asks
        get_num_new_matched_tokens as often as it likes."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return None
        try:
            handoff = DecodeHandoff.from_params(params, self.total_layers)
            handoff.check_prompt(request.prompt_token_ids or ())
        except HandoffRefused as refused:
            return refused
        return handoff

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        """Side-effect free, as vLLM requires: what to load is decided again,
        from the answer vLLM took, in update_state_after_alloc."""
        handoff = self._handoff(request)
        if not isinstance(handoff, DecodeHandoff):
            return 0, False  # none, or refused: recompute now rather than wait for a load
        num_prompt = len(request.prompt_token_ids or ())
        count = num_prompt - num_computed_tokens
        if count <= 0:
            return 0, False
        if num_prompt - 1 > num_computed_tokens and self._arrived(handoff):
            # Load now, before this step's forward pass, which computes the last
            # prompt token: the first token comes out of this very step.
            return count - 1, False
        return count, True

    def _arrived(self, handoff: DecodeHandoff) -> bool:
        """Whether every rank of this engine holds its part of the transfer.
        Only where each rank loads one part under the plain transfer id (one
        prefill stage, and prefill TP dividing ours); other layouts load
        asynchronously."""
        if self.listen_endpoint is None or (self.layers_per_stage and len(self.layers_per_stage) > 1):
            return False
        if handoff.prefill_layers and len(handoff.prefill_layers) > 1:
            return False
        if handoff.prefill_tp > self.tp_size or self.tp_size % handoff.prefill_tp:
            return False
        return all(has_arrived(rank_endpoint(self.listen_endpoint, rank), handoff.transfer_id) for rank in range(self.tp_size))

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params:
            return
        if params.get("do_remote_prefill"):
            handoff = self._handoff(request)
            # One load per request: after a failed load vLLM asks again with
            # num_computed_tokens=0, and must then get 0 (recompute).
            params["do_remote_prefill"] = False
            if isinstance(handoff, HandoffRefused):
                self._refuse(request, handoff)
            elif handoff is not None and num_external_tokens > 0:
                self._loads.append(self._load_spec(request, handoff, blocks, num_external_tokens))
        elif params.get("do_remote_decode") and request.request_id not in self._sending and request.request_id not in self._sent:
            # (A request preempted after its prompt went out is not sent twice.)
            self._start_sending(request, params)

    def _refuse(self, request: "Request", refused: HandoffRefused) -> None:
        """Counted as a failed load (recomputed), broken down by reason as
        load_timeouts is; once per request, not per worker rank."""
        logger.warning("kvtransfer: request %s recomputes its prompt: %s", request.request_id, refused)
        if refused.counter:
            self.stats.add(refused.counter)
            self.stats.add("transfers_loaded_failed")
            self.stats.flush(force=True)  # rare; readers see it at once
        if refused.handoff is not None:  # another prompt's KV: no request here will load it
            handoff = refused.handoff
            self._forgets.append(ForgetSpec(handoff.transfer_id, handoff.prefill_tp, handoff.prefill_layers))

    def _load_spec(self, request: "Request", handoff: DecodeHandoff, blocks: "KVCacheBlocks", num_external_tokens: int) -> LoadSpec:
        """What the worker loads, from the answer vLLM took. vLLM offered a
        block-aligned local prefix hit L (its block_aligned_local); we answered
        prompt - L (asynchronous) or prompt - 1 - L (synchronous). As L is a
        multiple of the block size (> 1 here, see __init__), only one of the
        two can give num_external_tokens: that one was taken."""
        prompt = request.prompt_token_ids or ()
        is_sync = self.listen_endpoint is not None and (len(prompt) - 1 - num_external_tokens) % self.block_size == 0
        local_tokens = len(prompt) - num_external_tokens - (1 if is_sync else 0)
        local_hit_blocks = local_tokens // self.block_size
        block_ids = blocks.get_block_ids()[0][local_hit_blocks : self._num_blocks(len(prompt))]
        return LoadSpec(
            request_id=request.request_id,
            transfer_id=handoff.transfer_id,
            prompt_hash=handoff.prompt_hash,
            num_tokens=len(prompt),
            first_block=local_hit_blocks,
            block_ids=list(block_ids),
            prefill_tp=handoff.prefill_tp,
            prefill_layers=handoff.prefill_layers,
            sync=is_sync,
        )

    # -- prefill -------------------------------------------------------------------------

    def _start_sending(self, request: "Request", params: dict[str, Any]) -> None:
        try:
            target = PrefillParams.from_params(params, self.total_layers)
        except ValueError as exc:
            # Without a handoff the router's decode request recomputes at once.
            logger.warning("kvtransfer: request %s: not sending its KV: %s", request.request_id, exc)
            return
        prompt = request.prompt_token_ids or ()
        # The block holding the last prompt token always goes: decode recomputes that token.
        skip = min(target.skip_blocks, (len(prompt) - 1) // self.block_size)
        self._sending[request.request_id] = _Sending(
            request, target.transfer_id, target.decode_endpoint, prompt_hash(prompt), len(prompt), target.decode_tp,
            target.decode_layers, blocks_sent=skip,
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> HexConnectorMetadata:
        meta = HexConnectorMetadata(loads=self._loads, drops=self._drops, forgets=self._forgets)
        self._loads, self._drops, self._forgets = [], [], []
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
                    is_first=not state.begun,
                    is_last=is_last,
                    decode_tp=state.decode_tp,
                    decode_layers=state.decode_layers,
                )
            )
            state.blocks_sent = upto
            state.begun = True
            if is_last:
                self._sent[request_id] = self._sending.pop(request_id)
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return False, None
        unfinished = self._sending.pop(request.request_id, None)
        if unfinished is not None:
            # Finished (aborted) before its whole prompt was computed: nothing to decode from.
            if unfinished.begun:
                self._drops.append(
                    DropSpec(unfinished.endpoint, unfinished.transfer_id, unfinished.decode_tp, unfinished.decode_layers)
                )
            return False, None
        state = self._sent.pop(request.request_id, None)
        if state is None:
            return False, None
        handoff = DecodeHandoff(
            transfer_id=state.transfer_id,
            num_prompt_tokens=state.num_tokens,
            prompt_hash=state.prompt_hash,
            prefill_tp=self.tp_size,
            prefill_layers=self.layers_per_stage,
            decode_endpoint=state.endpoint,
        )
        return False, handoff.to_params()
