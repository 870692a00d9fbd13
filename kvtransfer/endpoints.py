"""Where a decode worker's KV receivers listen, and what they leave on the host.

Every rank of a decode engine (pipeline stage x TP rank) binds its own
receiver at `rank_endpoint(kv_endpoint, rank)`. A receiver leaves two things
on the machine that a killed worker cannot clean up: the socket file of an
ipc:// endpoint (ZeroMQ leaves it behind on close) and its arrival-mark folder
(kvtransfer.arrivals). A launcher that stops a decode worker calls
`remove_receiver_files` so neither outlives it.
"""

from __future__ import annotations

import shutil

from common.sockets import ipc_path
from kvtransfer.arrivals import arrivals_dir
from kvtransfer.handoff import rank_endpoint


def remove_receiver_files(kv_endpoint: str, num_ranks: int = 1) -> None:
    """Remove the ipc socket file and the arrival-mark folder of every rank's
    receiver of the decode worker listening at `kv_endpoint` (ranks 0 ..
    num_ranks - 1). Files already gone are no error; tcp endpoints have no
    socket file."""
    for rank in range(num_ranks):
        endpoint = rank_endpoint(kv_endpoint, rank)
        if (path := ipc_path(endpoint)) is not None:
            path.unlink(missing_ok=True)
        shutil.rmtree(arrivals_dir(endpoint), ignore_errors=True)
