"""The kv_transfer_params that go router → prefill → router → decode, as typed structs.

Who calls what:

1. A worker builds its engine with
   ``EngineSettings(kv_transfer_config=connector_config(role, listen_endpoint=...))``
   (kvtransfer.options). A decode ("consumer") worker listens for KV on
   `listen_endpoint` (tcp://HOST:PORT or ipc:///path); the router must know
   that address. A prefill ("producer") worker needs no endpoint.

2. The router picks prefill worker P and decode worker D, then submits to P
   the prompt token ids with ``SamplingParams(max_tokens=1, extra_args=
   {"kv_transfer_params": prefill_params(decode_endpoint=D's endpoint,
   decode_tp=D's tensor_parallel_size)})`` (a `PrefillParams`).
   While P computes the prompt, its connector pushes the KV cache, layer by
   layer, to D's endpoint, where it waits (under a lease) to be claimed.

3. When P's request finishes, ``RequestOutput.kv_transfer_params`` is a
   `DecodeHandoff` as a dict. The router forwards it unchanged (see
   `decode_params_from`) to D as ``SamplingParams(..., extra_args=
   {"kv_transfer_params": that dict})`` with the same prompt token ids and
   the client's real sampling params. D's connector checks the handoff
   (protocol version, and that its prompt hash and length are those of the
   prompt D serves), reports the prompt as externally computed, copies the
   received blocks into its paged cache and decodes. D's output starts with
   the first generated token (P's single token is not needed).

4. If the handoff is refused, or the KV never arrives, is corrupt, or was for
   another prompt, D recomputes the prompt itself
   (kv_load_failure_policy="recompute"), the request still completes, and
   the reason is counted (kvtransfer.stats).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.sockets import check_endpoint
from kvtransfer.protocol import PROTOCOL_VERSION
from kvtransfer.reshard import layer_partition

logger = logging.getLogger(__name__)


class HandoffRefused(ValueError):
    """Decode will not load the KV a handoff names; it recomputes the prompt.
    `counter` is the stats counter that counts the reason (None: logged only);
    `handoff` is the refused handoff when it could be read (its transfer's
    bytes can then be dropped at once)."""

    def __init__(self, reason: str, counter: str | None = None, handoff: "DecodeHandoff | None" = None) -> None:
        super().__init__(reason)
        self.counter = counter
        self.handoff = handoff


@dataclass(frozen=True, slots=True)
class PrefillParams:
    """Router → prefill: where to send the prompt's KV, and how decode splits it."""

    decode_endpoint: str
    transfer_id: str
    decode_tp: int = 1  # decode's tensor_parallel_size: where each slice of heads goes
    decode_layers: tuple[int, ...] | None = None  # decode's layers per pipeline stage; None: one stage
    # The prompt's first blocks decode already holds in its prefix cache (the router's
    # prefix index says so): they are not sent. Prefill always sends the last token's block.
    skip_blocks: int = 0

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "do_remote_decode": True,
            "decode_endpoint": self.decode_endpoint,
            "transfer_id": self.transfer_id,
            "decode_tp": self.decode_tp,
        }
        if self.decode_layers is not None and len(self.decode_layers) > 1:
            params["decode_layers"] = list(self.decode_layers)
        if self.skip_blocks:
            params["skip_blocks"] = self.skip_blocks
        return params

    @classmethod
    def from_params(cls, params: dict[str, Any], total_layers: int | None = None) -> "PrefillParams":
        """Read (client-supplied, so checked) params. A missing endpoint or id,
        or a split that does not cover this model, raises ValueError: nothing
        is sent and the router's decode request recomputes. A bad decode_tp
        is taken as 1, with a warning."""
        endpoint, transfer_id = params.get("decode_endpoint"), params.get("transfer_id")
        if not endpoint or not transfer_id:
            raise ValueError("do_remote_decode but no decode_endpoint/transfer_id")
        layers = params.get("decode_layers")
        decode_layers = None if layers is None else layer_partition(layers, total_layers, "decode_layers")
        decode_tp = params.get("decode_tp", 1)
        if not _is_positive_int(decode_tp):
            logger.warning("kvtransfer: ignoring tensor-parallel size %r in kv_transfer_params; using 1", decode_tp)
            decode_tp = 1
        skip_blocks = params.get("skip_blocks", 0)
        if not (skip_blocks == 0 or _is_positive_int(skip_blocks)):
            logger.warning("kvtransfer: ignoring skip_blocks=%r in kv_transfer_params; sending every block", skip_blocks)
            skip_blocks = 0
        return cls(str(endpoint), str(transfer_id), decode_tp, decode_layers, skip_blocks)


@dataclass(frozen=True, slots=True)
class DecodeHandoff:
    """Prefill → router → decode: which transfer holds the prompt's KV, and
    what decode checks before loading it."""

    transfer_id: str
    num_prompt_tokens: int
    prompt_hash: str  # prompt_hash() of the prompt token ids prefill computed
    kv_protocol_version: int = PROTOCOL_VERSION
    prefill_tp: int = 1  # prefill's tensor_parallel_size: how many parts hold a decode rank's heads
    prefill_layers: tuple[int, ...] | None = None  # prefill's layers per pipeline stage; None: one stage
    decode_endpoint: str = ""  # where prefill sent it (for the reader; decode knows its own)

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": self.transfer_id,
            "decode_endpoint": self.decode_endpoint,
            "num_prompt_tokens": self.num_prompt_tokens,
            "prompt_hash": self.prompt_hash,
            "prefill_tp": self.prefill_tp,
            "kv_protocol_version": self.kv_protocol_version,
        }
        if self.prefill_layers is not None and len(self.prefill_layers) > 1:
            params["prefill_layers"] = list(self.prefill_layers)
        return params

    @classmethod
    def from_params(cls, params: dict[str, Any], total_layers: int | None = None) -> "DecodeHandoff":
        """Read a handoff, or raise HandoffRefused saying why decode must not
        load from it. The version is checked first: another version's fields
        may mean something else."""
        version = params.get("kv_protocol_version")
        if version != PROTOCOL_VERSION:
            raise HandoffRefused(
                f"handoff has kv_protocol_version={version!r}; this decode worker speaks {PROTOCOL_VERSION} "
                "(prefill and decode run different kvtransfer versions?)",
                "transfers_refused_version",
            )
        transfer_id, prompt, count = params.get("transfer_id"), params.get("prompt_hash"), params.get("num_prompt_tokens")
        if not isinstance(transfer_id, str) or not transfer_id:
            raise HandoffRefused(f"handoff has no transfer_id (got {transfer_id!r})")
        if not isinstance(prompt, str) or not _is_positive_int(count):
            raise HandoffRefused(
                f"handoff names no prompt (prompt_hash={prompt!r}, num_prompt_tokens={count!r})", "transfers_refused_prompt_hash"
            )
        prefill_tp = params.get("prefill_tp", 1)
        if not _is_positive_int(prefill_tp):
            raise HandoffRefused(f"handoff has prefill_tp={prefill_tp!r}; expected prefill's tensor_parallel_size, an int >= 1")
        layers = params.get("prefill_layers")
        try:
            prefill_layers = None if layers is None else layer_partition(layers, total_layers, "prefill_layers")
        except ValueError as exc:
            raise HandoffRefused(str(exc)) from None
        return cls(transfer_id, count, prompt, version, prefill_tp, prefill_layers, str(params.get("decode_endpoint") or ""))

    def check_prompt(self, token_ids: Sequence[int]) -> None:
        """Raise HandoffRefused unless this handoff is for exactly these prompt tokens."""
        if self.num_prompt_tokens != len(token_ids) or self.prompt_hash != prompt_hash(token_ids):
            raise HandoffRefused(
                f"handoff is for another prompt ({self.num_prompt_tokens} tokens, hash {self.prompt_hash}); "
                f"this request has {len(token_ids)} tokens, hash {prompt_hash(token_ids)}",
                "transfers_refused_prompt_hash",
                self,
            )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def new_transfer_id() -> str:
    return uuid.uuid4().hex


def prefill_params(
    decode_endpoint: str, transfer_id: str | None = None, decode_tp: int = 1, decode_layers: Sequence[int] | None = None,
    skip_blocks: int = 0,
) -> dict[str, Any]:
    """kv_transfer_params for the prefill request (put in SamplingParams.extra_args).

    decode_tp: the decode engine's tensor_parallel_size. With the same TP as
    prefill each rank sends to its twin; with k times prefill's TP each
    prefill rank splits its KV heads k ways (see kvtransfer.reshard).
    decode_layers: a pipelined decode engine's layers per stage (its
    VLLM_PP_LAYER_PARTITION); each prefill stage sends each decode stage the
    layers it holds. None: decode has one stage.
    """
    if not _is_positive_int(decode_tp):
        raise ValueError(f"decode_tp={decode_tp!r} must be the decode engine's tensor_parallel_size (an int >= 1)")
    layers = None
    if decode_layers is not None and len(decode_layers) > 1:
        layers = layer_partition(decode_layers, name="decode_layers")
    if not (skip_blocks == 0 or _is_positive_int(skip_blocks)):
        raise ValueError(f"skip_blocks={skip_blocks!r} must be an int >= 0")
    return PrefillParams(check_endpoint(decode_endpoint), transfer_id or new_transfer_id(), decode_tp, layers,
                         skip_blocks).to_params()


def decode_params_from(prefill_output_params: dict[str, Any] | None) -> dict[str, Any] | None:
    """What to forward to decode: the prefill output's kv_transfer_params, unchanged.

    The router does not read them (decode checks them, `DecodeHandoff`).
    None (the prefill was aborted before its prompt was sent) means: run the
    decode request without kv_transfer_params; it recomputes the prompt.
    """
    if not prefill_output_params or not prefill_output_params.get("do_remote_prefill"):
        return None
    return dict(prefill_output_params)


def prompt_hash(token_ids: Sequence[int]) -> str:
    """Identifies a prompt: decode refuses KV computed for different tokens."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=8).hexdigest()
