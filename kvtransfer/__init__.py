"""kvtransfer: KV-cache transfer from prefill to decode over ZeroMQ, as a vLLM KV connector.

Map of the package (one concept per module):

    the contract      options        connector_config: the kv_transfer_config an engine is built with;
                                     link_checksum: which links carry payload checksums
                      handoff        kv_transfer_params router -> prefill -> router -> decode, typed, checked
                      endpoints      where a decode worker's rank receivers listen; the files they leave
                      stats          transfer counters, a JSON file per process (why not vLLM's channel)
    the wire          protocol       every message, its version and size limits
                      framing        the one builder of KV messages (production, tests, benchmark);
                                     a Chunk packs several small layers
                      codec          tensor <-> payload bytes (raw, int8)
    the transport     sender         prefill: bounded send queue, one I/O thread, Acks
                      receiver       decode: ROUTER socket, one I/O thread, feeding the assembler
                      assembler      decode: frames in, verified transfers out (no sockets)
                      arrivals       decode: which transfers arrived, told to the scheduler
                      allocator      decode: keep freed frame memory for reuse
    the connector     connector      HexKVConnector, the class vLLM loads
                      scheduler_side EngineCore: which blocks go when, which loads are synchronous
                      metadata       what the scheduler side tells the worker side each step
                      worker_side    one rank's pieces put together, vLLM's worker calls routed
                      cache_layout   the paged cache's block and head axes; gather and scatter
                      reshard        TP/PP arithmetic: which parts a rank sends or loads (pure)
                      send_path      prefill: a layer's blocks, gathered, to each decode rank
                      load_path      decode: received parts into the request's blocks

The send and load paths stay here rather than in prefill/ and decode/: vLLM
imports the connector by `kv_connector_module_path` as one class, inside its
engine processes, for both roles (a kv_both engine runs both paths), and the
two paths share the cache layout, the resharding arithmetic, the metadata
and the protocol. prefill/ and decode/ sit above the worker layer and
kvtransfer below it, so kvtransfer cannot import them; splitting the paths
off would leave the connector importing upwards.

Public API (the router and the workers use only these): `connector_config`,
`stats_path`, `read_stats`, `remove_stats`, `prefill_params`, `decode_params_from`,
`new_transfer_id`, `prompt_hash`, `rank_endpoint`, `rank_endpoint_list`, `endpoint_parts`,
`remove_receiver_files`, and
`STATS_DIR_ENV` (where a launcher wants a worker's counters folder).
The connector module is imported by vLLM, never at package import.
"""

from kvtransfer.endpoints import endpoint_parts, rank_endpoint, rank_endpoint_list, remove_receiver_files
from kvtransfer.handoff import decode_params_from, new_transfer_id, prefill_params, prompt_hash
from kvtransfer.options import connector_config, stats_path
from kvtransfer.stats import STATS_DIR_ENV, read_stats, remove_stats

__all__ = [
    "STATS_DIR_ENV",
    "connector_config",
    "decode_params_from",
    "new_transfer_id",
    "prefill_params",
    "prompt_hash",
    "endpoint_parts",
    "rank_endpoint",
    "rank_endpoint_list",
    "read_stats",
    "remove_stats",
    "remove_receiver_files",
    "stats_path",
]
