"""Worker-side connector (runs in the process that holds the KV cache tensors).

Puts one rank's pieces together once vLLM registers the cache: its layout
(kvtransfer.cache_layout), what it holds of the model (kvtransfer.reshard),
its counters, and, by role, the sender and the send path (prefill,
kvtransfer.send_path) or the receiver and the load path (decode,
kvtransfer.load_path). vLLM's calls are forwarded to the path they concern.

Parallel engines: every rank (pipeline stage x TP rank) moves its own KV, on
its own socket. A transfer may reach a decode rank in parts, one from each
prefill rank holding some of its heads and layers; chunks name the model's
layer numbers, so a stage's part fills exactly the layers it computed.
"""

from __future__ import annotations

import torch

from kvtransfer.assembler import Assembler
from kvtransfer.cache_layout import CacheLayout
from kvtransfer.endpoints import rank_endpoint
from kvtransfer.load_path import LoadPath, begin_mismatch
from kvtransfer.metadata import HexConnectorMetadata
from kvtransfer.options import ConnectorOptions
from kvtransfer.protocol import Limits
from kvtransfer.receiver import KVReceiver
from kvtransfer.reshard import RankShape
from kvtransfer.send_path import SendPath
from kvtransfer.sender import KVSender
from kvtransfer.stats import Stats, rank_stats_path


class WorkerSide:
    def __init__(
        self,
        options: ConnectorOptions,
        *,
        is_producer: bool,
        is_consumer: bool,
        num_blocks: int,
        rank: int = 0,
        tp_size: int = 1,
        kv_heads: int | None = None,
        pp_rank: int = 0,
        pp_size: int = 1,
        total_layers: int | None = None,
    ) -> None:
        self.options = options
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.num_blocks = num_blocks
        # Tensor-parallel rank: this worker moves only its slice of the KV heads.
        self.rank, self.tp_size, self.kv_heads = rank, tp_size, kv_heads
        # Pipeline stage: this worker holds (and moves) only its stage's layers.
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.total_layers = total_layers  # None: this worker's layers are all of them (pp_size 1)
        self.worker_index = pp_rank * tp_size + rank  # vLLM's rank numbering: our socket and stats file
        self.stats = Stats(rank_stats_path(options.stats_path, self.worker_index) if options.stats_path else None)
        self.layout: CacheLayout | None = None
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        self.send_path: SendPath | None = None
        self.load_path: LoadPath | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = self.layout = CacheLayout(kv_caches, self.num_blocks, self.kv_heads, pipelined=self.pp_size > 1)
        if self.total_layers is None:
            self.total_layers = layout.first_layer + layout.num_layers
        shape = RankShape(
            tp_rank=self.rank, tp_size=self.tp_size, pp_rank=self.pp_rank, pp_size=self.pp_size,
            first_layer=layout.first_layer, num_layers=layout.num_layers, total_layers=self.total_layers,
            num_heads=layout.num_heads,
        )
        opts = self.options
        if self.is_producer and self.sender is None:
            self.sender = KVSender(
                self.stats,
                max_queued_bytes=opts.max_queued_bytes,
                enqueue_timeout_s=opts.enqueue_timeout_s,
                send_timeout_ms=opts.send_timeout_ms,
                ack_timeout_s=opts.ack_timeout_s,
            )
            self.send_path = SendPath(opts, layout, shape, self.sender)
        if self.is_consumer and self.receiver is None:
            if not opts.listen_endpoint:
                raise ValueError("a kv_consumer needs kv_connector_extra_config['listen_endpoint']")
            assembler = Assembler(
                Limits(),
                max_buffer_bytes=opts.max_buffer_bytes,
                transfer_timeout_s=opts.transfer_timeout_s,
                lease_s=opts.lease_s,
                reclaim_s=opts.reclaim_s,
                expected=lambda begin: begin_mismatch(begin, layout),
            )
            self.receiver = KVReceiver(rank_endpoint(opts.listen_endpoint, self.worker_index), assembler, self.stats)
        self.load_path = LoadPath(opts, layout, shape, self.receiver, self.stats)
        self.stats.flush(force=True)

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()
        self.stats.flush(force=True)

    # -- prefill ---------------------------------------------------------------------------

    def save_kv_layer(self, meta: HexConnectorMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        if meta.sends and self.send_path is not None:
            self.send_path.save_layer(meta, layer_name, kv_layer)

    def wait_for_save(self, meta: HexConnectorMetadata) -> None:
        if self.send_path is not None:
            self.send_path.finish_step(meta)

    # -- decode ----------------------------------------------------------------------------

    def start_load_kv(self, meta: HexConnectorMetadata) -> None:
        assert self.load_path is not None, "register_kv_caches comes first"
        self.load_path.forget(meta.forgets)
        self.load_path.start(meta.loads)

    def take_invalid_blocks(self) -> set[int]:
        """Blocks that synchronous loads could not fill since the last call."""
        return self.load_path.take_invalid_blocks() if self.load_path is not None else set()

    def take_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(finished_recving, failed_recving) since the last call."""
        results = self.load_path.take_results(finished_req_ids) if self.load_path is not None else (set(), set())
        self.stats.flush()
        return results
