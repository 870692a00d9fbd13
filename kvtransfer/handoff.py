"""The contract between the router, the prefill/decode workers and the connector.

Who calls what:

1. A worker builds its engine with
   ``EngineSettings(kv_transfer_config=connector_config(role, listen_endpoint=...))``.
   A decode ("consumer") worker listens for KV on `listen_endpoint`
   (tcp://HOST:PORT or ipc:///path); the router must know that address.
   A prefill ("producer") worker needs no endpoint.

2. The router picks prefill worker P and decode worker D, then submits to P
   the prompt token ids with ``SamplingParams(max_tokens=1, extra_args=
   {"kv_transfer_params": prefill_params(decode_endpoint=D's endpoint,
   decode_tp=D's tensor_parallel_size)})``.
   While P computes the prompt, its connector pushes the KV cache, layer by
   layer, to D's endpoint, where it waits (under a lease) to be claimed.

3. When P's request finishes, ``RequestOutput.kv_transfer_params`` is an opaque
   dict (see `decode_params_from`). The router forwards it unchanged to D as
   ``SamplingParams(..., extra_args={"kv_transfer_params": that dict})`` with the
   same prompt token ids and the client's real sampling params. D's connector
   reports the prompt as externally computed, copies the received blocks into
   its paged cache and decodes. D's output starts with the first generated
   token (P's single token is not needed).

4. If the KV never arrives, is corrupt, or was for another prompt, D recomputes
   the prompt itself (kv_load_failure_policy="recompute"), the request still
   completes, and the failure is counted in the worker's stats file.

Counters: every engine's connector writes JSON counters to the file named by
``stats_path(config)``; read them with ``kvtransfer.read_stats(path)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from kvtransfer.protocol import CHECKSUMS, DEFAULT_CHECKSUM, MAX_CHUNK_BYTES
from kvtransfer.reshard import layer_partition
from common.sockets import check_endpoint

CONNECTOR_NAME = "HexKVConnector"
CONNECTOR_MODULE = "kvtransfer.connector"
ROLES = {"producer": "kv_producer", "consumer": "kv_consumer", "both": "kv_both"}


@dataclass(slots=True)
class ConnectorOptions:
    """Everything the connector reads from kv_connector_extra_config."""

    listen_endpoint: str | None = None  # consumer: where KV arrives
    stats_path: str | None = None
    encoding: str = "raw"  # "int8": quantise payloads for slow links (lossy)
    checksum: str = DEFAULT_CHECKSUM  # xxh3 | blake3 | crc32 | none (see protocol.CHECKSUMS)
    load_timeout_s: float = 30.0  # decode: how long a request waits for its KV
    # decode: a request whose KV already arrived loads it in the step that admits it
    # (first token one engine step sooner); False: always vLLM's asynchronous path.
    sync_load: bool = True
    transfer_timeout_s: float = 30.0  # decode: Begin..End must finish within this
    lease_s: float = 60.0  # decode: unclaimed complete KV is dropped after this
    reclaim_s: float = 5.0  # decode: claimed KV stays loadable this long (n > 1 siblings)
    max_buffer_bytes: int = 2 * 1024**3  # decode: received, unclaimed KV
    max_queued_bytes: int = 256 * 1024**2  # prefill: KV waiting for the socket
    max_chunk_bytes: int = MAX_CHUNK_BYTES  # prefill: a layer's blocks go in chunks of at most this (>= 1 block)
    enqueue_timeout_s: float = 10.0
    send_timeout_ms: int = 5000
    ack_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.listen_endpoint is not None:
            check_endpoint(self.listen_endpoint)
        if self.encoding not in ("raw", "int8"):
            raise ValueError(f"encoding={self.encoding!r}; use 'raw' (exact) or 'int8' (lossy, 2-4x smaller)")
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"checksum={self.checksum!r}; use one of {CHECKSUMS}")
        if self.max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes={self.max_chunk_bytes} must be > 0 (a chunk always holds at least one block)")
        for name in ("load_timeout_s", "transfer_timeout_s", "lease_s", "reclaim_s", "enqueue_timeout_s", "ack_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 seconds")

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> "ConnectorOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown kvtransfer options {unknown}; known: {sorted(known)}")
        return cls(**extra)


def default_stats_path(role: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"hexserve-kvtransfer-{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json")


def connector_config(role: str, listen_endpoint: str | None = None, **options: Any) -> dict[str, Any]:
    """kv_transfer_config for `EngineSettings` / `vllm.LLM`. role: producer | consumer | both."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}; use one of {sorted(ROLES)}")
    if role in ("consumer", "both") and not listen_endpoint:
        raise ValueError(f"role={role!r} receives KV, so it needs listen_endpoint='tcp://HOST:PORT' or 'ipc:///path'")
    options.setdefault("stats_path", default_stats_path(role))
    opts = ConnectorOptions(listen_endpoint=listen_endpoint, **options)
    extra = {k: v for k, v in asdict(opts).items() if v is not None}
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": ROLES[role],
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def stats_path(config: dict[str, Any]) -> str:
    """The counters file of an engine built with `config` (a connector_config result)."""
    return config["kv_connector_extra_config"]["stats_path"]


def rank_endpoint(endpoint: str, rank: int) -> str:
    """Where rank `rank` of a decode worker listens for its shard.

    Each rank of a TP/PP engine holds its own slice of the KV heads (TP) of
    its own layers (PP) and moves it on its own socket. Ranks are numbered as
    vLLM does: pipeline stage x tensor_parallel_size + TP rank. Rank 0 uses the
    endpoint as given (so one rank is unchanged); rank r uses port + r for tcp
    and a `.rank<r>` suffix for ipc/inproc. A launcher gives a decode worker a
    base port with the next tp*pp-1 ports free (router.launch_local.local_endpoint).
    """
    check_endpoint(endpoint)
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if not port.isdigit():
            raise ValueError(f"endpoint {endpoint!r} needs a numeric port for tensor-parallel rank {rank}")
        if int(port) + rank > 65535:
            raise ValueError(f"endpoint {endpoint!r}: port + rank {rank} is past 65535")
        return f"tcp://{host}:{int(port) + rank}"
    return f"{endpoint}.rank{rank}"


def new_transfer_id() -> str:
    return uuid.uuid4().hex


def prefill_params(
    decode_endpoint: str, transfer_id: str | None = None, decode_tp: int = 1, decode_layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """kv_transfer_params for the prefill request (put in SamplingParams.extra_args).

    decode_tp: the decode engine's tensor_parallel_size. With the same TP as
    prefill each rank sends to its twin; with k times prefill's TP each
    prefill rank splits its KV heads k ways (see kvtransfer.reshard).
    decode_layers: a pipelined decode engine's layers per stage (its
    VLLM_PP_LAYER_PARTITION); each prefill stage sends each decode stage the
    layers it holds. None: decode has one stage.
    """
    if not isinstance(decode_tp, int) or decode_tp < 1:
        raise ValueError(f"decode_tp={decode_tp!r} must be the decode engine's tensor_parallel_size (an int >= 1)")
    params = {
        "do_remote_decode": True,
        "decode_endpoint": check_endpoint(decode_endpoint),
        "transfer_id": transfer_id or new_transfer_id(),
        "decode_tp": decode_tp,
    }
    if decode_layers is not None and len(decode_layers) > 1:
        params["decode_layers"] = list(layer_partition(decode_layers, name="decode_layers"))
    return params


def prefill_sampling_extra_args(
    decode_endpoint: str, transfer_id: str | None = None, decode_tp: int = 1, decode_layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """Convenience: the whole extra_args dict for the prefill request."""
    return {"kv_transfer_params": prefill_params(decode_endpoint, transfer_id, decode_tp, decode_layers)}


def decode_params_from(prefill_output_params: dict[str, Any] | None) -> dict[str, Any] | None:
    """What to forward to decode: the prefill output's kv_transfer_params, unchanged.

    None (the prefill was aborted before its prompt was sent) means: run the
    decode request without kv_transfer_params; it recomputes the prompt.
    """
    if not prefill_output_params or not prefill_output_params.get("do_remote_prefill"):
        return None
    return dict(prefill_output_params)


def prompt_hash(token_ids: Sequence[int]) -> str:
    """Identifies a prompt: decode refuses KV computed for different tokens."""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=8).hexdigest()
