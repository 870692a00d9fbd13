"""How a prefill worker starts: the shared worker command line with a producer connector."""

from __future__ import annotations

from typing import Any

from common.roles import Role
from engine.worker_main import WorkerCommandLine


def kv_transfer_config(kv_endpoint: str | None, kv_connector: str) -> dict[str, Any] | None:
    """The producer side of the KV connector (None: `--kv-connector none`, nothing shipped).

    A prefill worker sends KV and listens for none; the endpoint it is given is
    only recorded in the connector options."""
    if kv_connector == "none":
        return None
    from kvtransfer import connector_config

    return connector_config(role="producer", listen_endpoint=kv_endpoint)


COMMAND_LINE = WorkerCommandLine(
    role=Role.PREFILL,
    description="Run one prefill worker: computes prompts and ships their KV to decode workers.",
    kv_transfer_config=kv_transfer_config,
)
