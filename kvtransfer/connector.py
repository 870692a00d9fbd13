"""HexKVConnector: vLLM v1 KV connector that moves prefill KV to decode over ZeroMQ.

Load it with ``kvtransfer.connector_config(role, ...)`` (it sets
kv_connector="HexKVConnector", kv_connector_module_path="kvtransfer.connector").
vLLM builds one instance per role: SCHEDULER in EngineCore (metadata only,
see scheduler_side.py) and WORKER next to the model (tensors and sockets, see
worker_side.py); the two talk only through HexConnectorMetadata each step and
the finished/failed request ids the worker reports back. A TP x PP engine has
one WORKER per rank; each moves its own heads of its own layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from kvtransfer.options import ConnectorOptions
from kvtransfer.metadata import HexConnectorMetadata
from kvtransfer.scheduler_side import SchedulerSide
from kvtransfer.stats import Stats, scheduler_stats_path
from kvtransfer.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


class HexKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        kv_config = self._kv_transfer_config
        self.options = ConnectorOptions.from_extra_config(dict(kv_config.kv_connector_extra_config or {}))
        parallel = vllm_config.parallel_config
        layers_per_stage = _layers_per_stage(vllm_config)
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = SchedulerSide(
                vllm_config.cache_config.block_size,
                parallel.tensor_parallel_size,
                layers_per_stage,
                listen_endpoint=self.options.listen_endpoint if self.options.sync_load else None,
                stats=Stats(scheduler_stats_path(self.options.stats_path)) if self.options.stats_path else None,
            )
        else:
            self.worker_side = WorkerSide(
                self.options,
                is_producer=kv_config.is_kv_producer,
                is_consumer=kv_config.is_kv_consumer,
                num_blocks=kv_cache_config.num_blocks,
                rank=_tensor_parallel_rank(parallel.tensor_parallel_size),
                tp_size=parallel.tensor_parallel_size,
                kv_heads=vllm_config.model_config.get_num_kv_heads(parallel),
                pp_rank=_pipeline_rank(parallel.pipeline_parallel_size),
                pp_size=parallel.pipeline_parallel_size,
                total_layers=sum(layers_per_stage),
            )

    # -- worker side -----------------------------------------------------------------------

    def _meta(self) -> HexConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, HexConnectorMetadata)
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker_side is not None
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self.worker_side is not None
        self.worker_side.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Asynchronous loads finish before vLLM schedules the request and
        # synchronous ones inside start_load_kv, so no layer is left to wait for.
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker_side is not None
        return self.worker_side.take_invalid_blocks()

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        assert self.worker_side is not None
        self.worker_side.save_kv_layer(self._meta(), layer_name, kv_layer)

    def wait_for_save(self) -> None:
        assert self.worker_side is not None
        if self.has_connector_metadata():
            self.worker_side.wait_for_save(self._meta())

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self.worker_side is not None
        finished, failed = self.worker_side.take_results(set(finished_req_ids))
        return KVConnectorTransferResults(finished_sending=set(), finished_recving=finished, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return None, results.finished_recving or None

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()

    # -- scheduler side --------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        assert self.scheduler_side is not None
        self.scheduler_side.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler_side is not None
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self.scheduler_side is not None
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self.scheduler_side is not None
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler_side is not None
        return self.scheduler_side.request_finished(request, block_ids)


def _tensor_parallel_rank(tensor_parallel_size: int) -> int:
    """This worker's TP rank: it sends and receives only its own slice of the KV heads."""
    if tensor_parallel_size == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def _pipeline_rank(pipeline_parallel_size: int) -> int:
    """This worker's pipeline stage: it sends and receives only its own layers."""
    if pipeline_parallel_size == 1:
        return 0
    from vllm.distributed.parallel_state import get_pp_group

    return get_pp_group().rank_in_group


def _layers_per_stage(vllm_config: "VllmConfig") -> tuple[int, ...]:
    """This engine's layers per pipeline stage, as vLLM splits them (VLLM_PP_LAYER_PARTITION or even)."""
    from vllm.distributed.utils import get_pp_indices

    total = vllm_config.model_config.get_total_num_hidden_layers()
    stages = vllm_config.parallel_config.pipeline_parallel_size
    return tuple(stop - start for start, stop in (get_pp_indices(total, stage, stages) for stage in range(stages)))
