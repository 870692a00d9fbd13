"""How a connector is configured: the kv_transfer_config a worker builds its engine with.

`connector_config(role, listen_endpoint, **options)` returns the dict for
vLLM's kv_transfer_config; vLLM hands its `kv_connector_extra_config` to
every instance of the connector (scheduler and each worker rank), which
reads it back as `ConnectorOptions`, validated when built.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, fields
from typing import Any

from common.sockets import check_endpoint, tcp_address
from kvtransfer.protocol import CHECKSUMS, DEFAULT_CHECKSUM, MAX_CHUNK_BYTES
from kvtransfer.stats import default_stats_path

CONNECTOR_NAME = "HexKVConnector"
CONNECTOR_MODULE = "kvtransfer.connector"
ROLES = {"producer": "kv_producer", "consumer": "kv_consumer", "both": "kv_both"}


@dataclass(slots=True)
class ConnectorOptions:
    """Everything the connector reads from kv_connector_extra_config."""

    listen_endpoint: str | None = None  # consumer: where KV arrives
    stats_path: str | None = None
    encoding: str = "raw"  # "int8": quantise payloads for slow links (lossy)
    # auto: a payload checksum only on links that leave the host (link_checksum);
    # or one of protocol.CHECKSUMS (xxh3 | blake3 | crc32 | none) on every link.
    checksum: str = "auto"
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
        if self.checksum != "auto" and self.checksum not in CHECKSUMS:
            raise ValueError(f"checksum={self.checksum!r}; use 'auto' or one of {CHECKSUMS}")
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


def link_checksum(option: str, endpoint: str) -> str:
    """The payload checksum a sender uses towards `endpoint` under option `option`.

    "auto": none where both ends are on this host (an ipc:// Unix socket, TCP
    to a loopback address), DEFAULT_CHECKSUM (xxh3) otherwise. On one host a
    payload moves by the kernel copying it from one process's memory to the
    other's: no wire, NIC or switch can flip a bit in between, and a bit
    flipped in RAM would hit the paged cache as well, where no transfer
    checksum looks. Framing, sizes, layer and block coverage and the prompt
    hash are checked on every link. Between hosts, TCP's 16-bit checksum
    lets through some corruption that the Ethernet CRC did not see (bad NIC
    offload, a broken switch), so those links keep a payload checksum, at a
    second read of every byte on each side (measured in docs/kvtransfer.md,
    "Integrity"). A name that resolves to this host's own non-loopback
    address still counts as remote: the policy reads the endpoint, not DNS.
    """
    if option != "auto":
        return option
    address = tcp_address(endpoint)
    if address is None:  # ipc://: a Unix socket
        return "none"
    host = address[0].strip("[]")
    if host == "localhost":
        return "none"
    try:
        return "none" if ipaddress.ip_address(host).is_loopback else DEFAULT_CHECKSUM
    except ValueError:  # a host name: cannot tell without resolving it
        return DEFAULT_CHECKSUM


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
