"""How a decode worker starts: the shared worker command line with a consumer connector."""

from __future__ import annotations

from typing import Any

from common.roles import Role
from engine.worker_main import WorkerCommandLine


def kv_transfer_config(kv_endpoint: str | None, kv_connector: str) -> dict[str, Any] | None:
    """The consumer side of the KV connector, listening on `kv_endpoint` (rank r of
    a TP/PP engine on its own socket next to it); None: `--kv-connector none`,
    every prompt is recomputed."""
    if kv_connector == "none":
        return None
    if not kv_endpoint:
        raise ValueError("a decode worker needs --kv-endpoint (where prefill workers send KV)")
    from kvtransfer import connector_config

    return connector_config(role="consumer", listen_endpoint=kv_endpoint)


COMMAND_LINE = WorkerCommandLine(
    role=Role.DECODE,
    description="Run one decode worker: takes a prompt's KV from a prefill worker and generates the answer.",
    kv_transfer_config=kv_transfer_config,
)
