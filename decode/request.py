"""The decode request: how a finished prefill becomes the decode worker's request."""

from __future__ import annotations

from typing import Any

from engine.control_protocol import Output


def decode_kv_params(prefill_final: Output | None, kv_connector: str) -> dict[str, Any] | None:
    """The decode request's kv params: the prefill's handoff (its final output's
    kv_transfer_params), or None, and decode recomputes the prompt, when there
    is no connector or no handoff."""
    if kv_connector == "none" or prefill_final is None:
        return None
    from kvtransfer import decode_params_from

    return decode_params_from(prefill_final.kv_transfer_params)
