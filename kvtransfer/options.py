"""How a connector is configured: the kv_transfer_config a worker builds its engine with.

`connector_config(role, listen_endpoint, **options)` returns the dict for
vLLM's kv_transfer_config; vLLM hands its `kv_connector_extra_config` to
every instance of the connector (scheduler and each worker rank), which
reads it back as `ConnectorOptions`, validated when built.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any

from common.sockets import check_endpoint
from kvtransfer.protocol import CHECKSUMS, DEFAULT_CHECKSUM, MAX_CHUNK_BYTES

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
