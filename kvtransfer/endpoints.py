"""Where a decode worker's KV receivers listen, and what they leave on the host.

Every rank of a decode engine (pipeline stage x TP rank) binds its own
receiver at `rank_endpoint(kv_endpoint, rank)`. A receiver leaves two things
on the machine that a killed worker cannot clean up: the socket file of an
ipc:// endpoint (ZeroMQ leaves it behind on close) and its arrival-mark folder
(kvtransfer.arrivals). A launcher that stops a decode worker calls
`remove_receiver_files` so neither outlives it.

An engine whose ranks sit on several hosts (a plan group that spans nodes)
cannot derive every rank's endpoint from one base: its kv_endpoint is then
the list of every rank's endpoint, comma-separated (`rank_endpoint_list`).
"""

from __future__ import annotations

import shutil

from common.sockets import check_endpoint, ipc_path, tcp_address
from kvtransfer.arrivals import arrivals_dir


RANK_LIST_SEPARATOR = ","


def rank_endpoint_list(endpoints: list[str]) -> str:
    """One kv_endpoint naming each rank's endpoint in rank order (ranks on several hosts)."""
    for endpoint in endpoints:
        check_endpoint(endpoint)
        if RANK_LIST_SEPARATOR in endpoint:
            raise ValueError(f"endpoint {endpoint!r} holds {RANK_LIST_SEPARATOR!r}; name one endpoint per rank")
    return RANK_LIST_SEPARATOR.join(endpoints)


def endpoint_parts(endpoint: str) -> list[str]:
    """The endpoints a kv_endpoint names: itself, or each rank's of a rank list."""
    return endpoint.split(RANK_LIST_SEPARATOR)


def rank_endpoint(endpoint: str, rank: int) -> str:
    """Where rank `rank` of a decode worker listens for its shard.

    Each rank of a TP/PP engine holds its own slice of the KV heads (TP) of
    its own layers (PP) and moves it on its own socket. Ranks are numbered as
    vLLM does: pipeline stage x tensor_parallel_size + TP rank. Rank 0 uses the
    endpoint as given (so one rank is unchanged); rank r uses port + r for tcp
    and a `.rank<r>` suffix for ipc/inproc. A launcher gives a decode worker a
    base port with the next tp*pp-1 ports free (router.launch_local.local_endpoint).
    A rank list (`rank_endpoint_list`) names rank r's endpoint as its r-th entry.
    """
    if RANK_LIST_SEPARATOR in endpoint:
        ranks = endpoint_parts(endpoint)
        if not 0 <= rank < len(ranks):
            raise ValueError(f"endpoint list {endpoint!r} names {len(ranks)} ranks; rank {rank} has none")
        return check_endpoint(ranks[rank])
    check_endpoint(endpoint)
    if rank == 0:
        return endpoint
    if (address := tcp_address(endpoint)) is not None:  # a port that is not a number is refused there
        host, port = address
        if port + rank > 65535:
            raise ValueError(f"endpoint {endpoint!r}: port + rank {rank} is past 65535")
        return f"tcp://{host}:{port + rank}"
    return f"{endpoint}.rank{rank}"


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
