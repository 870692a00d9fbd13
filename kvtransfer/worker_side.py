"""Worker-side connector logic (runs in the process that holds the KV cache tensors).

Prefill: `save_kv_layer` runs right after each attention layer wrote this
step's KV; it gathers the request's finished blocks of that layer (one copy:
paged blocks are not contiguous) and queues them, without another copy, on the
sender's socket thread. `wait_for_save` closes a transfer with End once its
last prompt block went out. The gathered copy belongs to the transfer, so the
engine may reuse the paged blocks as soon as the step ends.

Decode: a load named by the scheduler waits until the receiver holds the
complete, verified transfer, checks it is for this prompt and this cache
layout, and copies it into the request's blocks (the one copy on this side).
It is reported finished; on failure or timeout it is also reported failed and
vLLM recomputes the prompt.

Parallel engines: every rank (pipeline stage x TP rank) moves its own KV, on
its own socket. A transfer may reach a decode rank in parts, one from each
prefill rank holding some of its heads and layers; chunks name the model's
layer numbers, so a stage's part fills exactly the layers it computed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from kvtransfer import codec, protocol
from kvtransfer.assembler import Assembler, Transfer
from kvtransfer.handoff import ConnectorOptions, rank_endpoint, stage_ranges
from kvtransfer.metadata import HexConnectorMetadata, LoadSpec, SendSpec
from kvtransfer.framing import block_ranges, chunk_message
from kvtransfer.protocol import Begin, End, Limits
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.stats import Stats, rank_stats_path

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Progress:
    num_chunks: int = 0
    payload_bytes: int = 0
    begun: bool = False
    failed: bool = False


@dataclass(frozen=True, slots=True)
class _Part:
    """One decode rank's share of a transfer: some layers, some (or all) KV heads.

    Prefill sends it as `transfer_id + suffix` to decode rank `rank`; decode
    assembles its cache from the parts that cover its layers and heads.
    """

    rank: int  # decode rank (its pipeline stage x its TP size + its TP rank)
    suffix: str  # "" | "#p<prefill stage>" + "" | "#h<head part>"
    heads: slice | None  # prefill: slice of our heads sent; decode: slice of our heads filled
    first_layer: int
    num_layers: int

    def holds(self, layer: int) -> bool:
        return self.first_layer <= layer < self.first_layer + self.num_layers


@dataclass(slots=True)
class _PendingLoad:
    spec: LoadSpec
    deadline_s: float


class CacheLayout:
    """Where the block axis is in each layer's cache tensor and what one block looks like."""

    def __init__(
        self, kv_caches: dict[str, torch.Tensor], num_blocks: int, kv_heads: int | None = None, pipelined: bool = False
    ) -> None:
        if not kv_caches:
            raise ValueError("register_kv_caches got no layers")
        self.names = list(kv_caches)
        self.tensors = list(kv_caches.values())
        # The model's layer number of each cache ("model.layers.17.self_attn.attn"
        # -> 17): a pipeline stage holds a contiguous range of them, and chunks
        # carry these numbers so stages with different splits agree on layers.
        self.number = _layer_numbers(self.names, pipelined)
        self.local = {number: i for i, number in enumerate(self.number.values())}
        self.first_layer, self.num_layers = min(self.local), len(self.local)
        first = self.tensors[0]
        if first.shape[0] == num_blocks:
            self.block_dim = 0  # CPU: [num_blocks, kv_heads, block_size, 2 * head_size]
        elif first.dim() > 1 and first.shape[0] == 2 and first.shape[1] == num_blocks:
            self.block_dim = 1  # flash-attn style: [2, num_blocks, ...]
        else:
            raise ValueError(f"cannot find the block axis (num_blocks={num_blocks}) in KV cache shape {tuple(first.shape)}")
        shape = list(first.shape)
        del shape[self.block_dim]
        self.block_shape = tuple(shape)
        self.dtype = codec.dtype_name(first.dtype)
        # The KV-head axis of one block, if exactly one axis has this rank's head
        # count (CPU: [kv_heads, block_size, 2 * head_size]; flash-attn:
        # [2, block_size, kv_heads, head_size]); None: heads cannot be split.
        axes = [i for i, size in enumerate(self.block_shape) if kv_heads and size == kv_heads]
        self.head_axis: int | None = axes[0] if len(axes) == 1 else None

    def gather(self, layer: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
        out = layer.index_select(self.block_dim, idx)
        if self.block_dim:
            out = out.movedim(self.block_dim, 0)
        return out.contiguous().cpu()

    def scatter(self, layer_index: int, block_ids: list[int], blocks: torch.Tensor, heads: slice | None = None) -> None:
        """Write blocks (n, *block_shape) into block_ids; with `heads`, into that slice of the KV heads only."""
        layer = self.tensors[layer_index]
        if heads is not None:
            assert self.head_axis is not None
            axis = self.head_axis + (1 if self.head_axis >= self.block_dim else 0)  # the block axis sits before it
            layer = layer.narrow(axis, heads.start, heads.stop - heads.start)
        idx = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
        src = blocks.to(layer.device)
        if self.block_dim:
            src = src.movedim(0, self.block_dim)
        layer.index_copy_(self.block_dim, idx, src)

    def head_slices(self, ways: int) -> list[slice] | None:
        """This cache's KV heads split `ways` ways, or None if they cannot be."""
        if self.head_axis is None or self.block_shape[self.head_axis] % ways:
            return None
        per = self.block_shape[self.head_axis] // ways
        return [slice(m * per, (m + 1) * per) for m in range(ways)]


def _layer_numbers(names: list[str], pipelined: bool) -> dict[str, int]:
    """name -> the model's layer number; positions 0.. if names do not number a contiguous range."""
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        numbers = [extract_layer_index(name) for name in names]
    except (AssertionError, ValueError):
        numbers = []
    if numbers and sorted(numbers) == list(range(min(numbers), min(numbers) + len(names))):
        return dict(zip(names, numbers))
    if pipelined:
        raise ValueError(f"cannot number KV layers {names[:3]}... one per model layer; a pipelined engine needs that")
    return {name: i for i, name in enumerate(names)}


def _shared_layers(layers_per_stage: tuple[int, ...], layout: CacheLayout) -> list[tuple[int, int, int]]:
    """(stage, first layer, layer count) of each stage of the other engine holding some of our layers."""
    ours = (layout.first_layer, layout.first_layer + layout.num_layers)
    shared = []
    for stage, (lo, hi) in enumerate(stage_ranges(layers_per_stage)):
        first, stop = max(lo, ours[0]), min(hi, ours[1])
        if first < stop:
            shared.append((stage, first, stop - first))
    return shared


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
        # Tensor-parallel rank: this worker moves only its slice of the KV heads,
        # to the decode rank(s) that hold the same heads (see `_targets`).
        self.rank, self.tp_size, self.kv_heads = rank, tp_size, kv_heads
        # Pipeline stage: this worker holds (and moves) only its stage's layers.
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.total_layers = total_layers  # None: this worker's layers are all of them (pp_size 1)
        self.worker_index = pp_rank * tp_size + rank  # vLLM's rank numbering: our socket and stats file
        self._parts: dict[tuple[int, tuple[int, ...] | None], list[_Part]] = {}
        self.stats = Stats(rank_stats_path(options.stats_path, self.worker_index) if options.stats_path else None)
        self.layout: CacheLayout | None = None
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        self._progress: dict[tuple[str, int], _Progress] = {}  # (transfer_id, decode rank)
        self._pending: dict[str, _PendingLoad] = {}
        self._finished: set[str] = set()
        self._failed: set[str] = set()
        self._claimed: dict[str, int] = {}  # transfer_id -> polls left before its bytes are released
        # Blocks of synchronous loads that found no KV: vLLM recomputes them (get_block_ids_with_load_errors).
        self._invalid_blocks: set[int] = set()

    # -- setup -----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout = CacheLayout(kv_caches, self.num_blocks, self.kv_heads, pipelined=self.pp_size > 1)
        if self.total_layers is None:
            self.total_layers = self.layout.first_layer + self.layout.num_layers
        opts = self.options
        if self.is_producer and self.sender is None:
            self.sender = KVSender(
                self.stats,
                max_queued_bytes=opts.max_queued_bytes,
                enqueue_timeout_s=opts.enqueue_timeout_s,
                send_timeout_ms=opts.send_timeout_ms,
                ack_timeout_s=opts.ack_timeout_s,
            )
        if self.is_consumer and self.receiver is None:
            if not opts.listen_endpoint:
                raise ValueError("a kv_consumer needs kv_connector_extra_config['listen_endpoint']")
            assembler = Assembler(
                Limits(),
                max_buffer_bytes=opts.max_buffer_bytes,
                transfer_timeout_s=opts.transfer_timeout_s,
                lease_s=opts.lease_s,
                reclaim_s=opts.reclaim_s,
                expected=self._check_begin,
            )
            self.receiver = KVReceiver(rank_endpoint(opts.listen_endpoint, self.worker_index), assembler, self.stats)
        self.stats.flush(force=True)

    def _check_begin(self, begin: Begin) -> str | None:
        """Refuse, before buffering anything, KV this cache cannot hold."""
        layout = self.layout
        assert layout is not None
        if begin.first_layer < layout.first_layer or begin.first_layer + begin.num_layers > layout.first_layer + layout.num_layers:
            return (
                f"layers {begin.first_layer}..{begin.first_layer + begin.num_layers - 1} are not all in this worker's "
                f"cache (layers {layout.first_layer}..{layout.first_layer + layout.num_layers - 1}; different model "
                "or pipeline split?)"
            )
        if not self._fits(tuple(begin.block_shape)) or begin.dtype != layout.dtype:
            return (
                f"block {begin.block_shape}/{begin.dtype} differs from this cache's "
                f"{layout.block_shape}/{layout.dtype} (different model, block_size, dtype or tensor_parallel_size?)"
            )
        return None

    def _fits(self, block_shape: tuple[int, ...]) -> bool:
        """Our block shape, or (one part from a prefill engine with more TP) ours with fewer KV heads."""
        layout = self.layout
        assert layout is not None
        if block_shape == layout.block_shape:
            return True
        axis = layout.head_axis
        if axis is None or len(block_shape) != len(layout.block_shape):
            return False
        others_equal = all(a == b for i, (a, b) in enumerate(zip(block_shape, layout.block_shape)) if i != axis)
        return others_equal and 0 < block_shape[axis] < layout.block_shape[axis] and layout.block_shape[axis] % block_shape[axis] == 0

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()
        self.stats.flush(force=True)

    # -- prefill ---------------------------------------------------------------------------

    def _head_targets(self, decode_tp: int) -> list[tuple[int, slice | None, str]]:
        """(decode TP rank, slice of our heads or None for all, part suffix) per destination.

        Same TP on both sides: decode rank r gets all of prefill rank r's heads.
        Decode TP = k x ours: our heads split k ways, slice m to decode rank
        r*k + m (each decode rank gets one whole part, shaped for its cache).
        Prefill TP = k x decode's: our whole shard goes to decode rank r // k as
        part `#h<r % k>`; that rank assembles its heads from k parts (see
        `_sources`). Anything else goes to rank r as is, where a different
        block shape is refused before buffering and decode recomputes.
        """
        layout = self.layout
        assert layout is not None
        if decode_tp > self.tp_size and decode_tp % self.tp_size == 0:
            slices = layout.head_slices(decode_tp // self.tp_size)
            if slices is not None:
                ways = len(slices)
                return [(self.rank * ways + m, heads, "") for m, heads in enumerate(slices)]
        if decode_tp < self.tp_size and self.tp_size % decode_tp == 0 and layout.head_axis is not None:
            ways = self.tp_size // decode_tp
            return [(self.rank // ways, None, f"#h{self.rank % ways}")]
        return [(self.rank, None, "")]

    def _targets(self, decode_tp: int, decode_layers: tuple[int, ...] | None = None) -> list[_Part]:
        """Every part this rank sends: to each decode stage holding some of our
        layers (decode_layers: its layers per stage), for each of its TP ranks
        holding some of our heads. Parts of a pipelined prefill are suffixed
        `#p<our stage>` so a decode rank can tell the stages' parts apart."""
        key = (decode_tp, decode_layers)
        if key not in self._parts:
            layout = self.layout
            assert layout is not None and self.total_layers is not None
            stage = f"#p{self.pp_rank}" if self.pp_size > 1 else ""
            self._parts[key] = [
                _Part(q * decode_tp + t, stage + suffix, heads, first, count)
                for q, first, count in _shared_layers(decode_layers or (self.total_layers,), layout)
                for t, heads, suffix in self._head_targets(decode_tp)
            ]
        return self._parts[key]

    def _sources(self, spec: LoadSpec) -> list[_Part]:
        """Every part this rank loads (the mirror of `_targets`): from each prefill
        stage holding some of our layers, each prefill rank holding some of our heads."""
        layout = self.layout
        assert layout is not None and self.total_layers is not None
        heads: list[tuple[str, slice | None]] = [("", None)]
        if spec.prefill_tp > self.tp_size and spec.prefill_tp % self.tp_size == 0:
            slices = layout.head_slices(spec.prefill_tp // self.tp_size)
            if slices is not None:
                heads = [(f"#h{m}", part) for m, part in enumerate(slices)]
        stages = spec.prefill_layers or (self.total_layers,)
        return [
            _Part(self.worker_index, (f"#p{s}" if len(stages) > 1 else "") + suffix, part, first, count)
            for s, first, count in _shared_layers(stages, layout)
            for suffix, part in heads
        ]

    def save_kv_layer(self, meta: HexConnectorMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        if not meta.sends or self.sender is None or self.layout is None:
            return
        layer = self.layout.number.get(layer_name)
        if layer is None:
            return
        for spec in meta.sends:
            targets = [part for part in self._targets(spec.decode_tp, spec.decode_layers) if part.holds(layer)]
            if not targets:
                continue
            blocks = self.layout.gather(kv_layer, spec.block_ids)
            for part in targets:
                transfer_id = spec.transfer_id + part.suffix
                progress = self._progress.setdefault((transfer_id, part.rank), _Progress())
                if progress.failed:
                    continue
                data = blocks if part.heads is None else self._heads(blocks, part.heads)
                if spec.is_first and not progress.begun:
                    progress.begun = True
                    self._send_begin(spec, transfer_id, part, tuple(data.shape[1:]), progress)
                self._send_chunks(spec, transfer_id, part.rank, layer, data, progress)

    def _heads(self, blocks: torch.Tensor, heads: slice) -> torch.Tensor:
        assert self.layout is not None and self.layout.head_axis is not None
        axis = self.layout.head_axis + 1  # blocks is (num_blocks, *block_shape)
        return blocks.narrow(axis, heads.start, heads.stop - heads.start).contiguous()

    def _send_chunks(
        self, spec: SendSpec, transfer_id: str, target: int, layer: int, blocks: torch.Tensor, progress: _Progress
    ) -> None:
        assert self.sender is not None
        if progress.failed:
            return
        block_bytes = math.prod(blocks.shape[1:]) * blocks.element_size()
        # Long prompts: several chunks per layer, each a view of `blocks` (no copy).
        for first, count in block_ranges(len(spec.block_ids), block_bytes, self.options.max_chunk_bytes):
            frames = chunk_message(
                transfer_id, layer, spec.first_block + first, blocks[first : first + count],
                encoding=self.options.encoding, checksum=self.options.checksum,
            )
            payload = frames[1]
            if not self.sender.submit(rank_endpoint(spec.endpoint, target), transfer_id, frames, len(payload)):
                progress.failed = True
                return
            progress.num_chunks += 1
            progress.payload_bytes += len(payload)

    def _send_begin(
        self, spec: SendSpec, transfer_id: str, part: _Part, block_shape: tuple[int, ...], progress: _Progress
    ) -> None:
        layout = self.layout
        assert layout is not None and self.sender is not None
        begin = Begin(
            protocol.PROTOCOL_VERSION,
            transfer_id,
            spec.request_id,
            spec.prompt_hash,
            spec.num_tokens,
            part.num_layers,
            spec.num_blocks,
            layout.dtype,
            block_shape,
            self.options.encoding,
            protocol.raw_bytes(layout.dtype, (part.num_layers, spec.num_blocks, *block_shape)),
            part.first_layer,
        )
        if not self.sender.submit(rank_endpoint(spec.endpoint, part.rank), transfer_id, [protocol.encode(begin)], 0):
            progress.failed = True

    def wait_for_save(self, meta: HexConnectorMetadata) -> None:
        if self.sender is None or self.layout is None:
            return
        for abort in meta.aborts:
            for part in self._targets(abort.decode_tp, abort.decode_layers):
                transfer_id = abort.transfer_id + part.suffix
                self._progress.pop((transfer_id, part.rank), None)
                self.sender.abort(rank_endpoint(abort.endpoint, part.rank), transfer_id, "prefill request ended before its prompt was computed")
        for spec in meta.sends:
            if not spec.is_last:
                continue
            for part in self._targets(spec.decode_tp, spec.decode_layers):
                transfer_id = spec.transfer_id + part.suffix
                progress = self._progress.pop((transfer_id, part.rank), _Progress())
                if progress.failed:
                    continue
                end = End(protocol.PROTOCOL_VERSION, transfer_id, progress.num_chunks, progress.payload_bytes)
                self.sender.submit(rank_endpoint(spec.endpoint, part.rank), transfer_id, [protocol.encode(end)], 0, is_end=True)

    # -- decode ----------------------------------------------------------------------------

    def start_load_kv(self, meta: HexConnectorMetadata) -> None:
        now = time.monotonic()
        for spec in meta.loads:
            self._pending[spec.request_id] = _PendingLoad(spec, now + self.options.load_timeout_s)
        self._poll_loads()
        for spec in meta.loads:
            if spec.sync:
                self._settle_sync_load(spec)

    def _settle_sync_load(self, spec: LoadSpec) -> None:
        """A synchronous load is done within this step, before the forward pass:
        the scheduler chose it because the KV had arrived (kvtransfer.arrivals).
        vLLM hears of it only if it failed, through its blocks, never as a
        finished receive (that is for requests parked waiting for their KV)."""
        request_id = spec.request_id
        loaded = request_id in self._finished and request_id not in self._failed
        self._finished.discard(request_id)
        self._failed.discard(request_id)
        if request_id in self._pending:  # the mark was stale: nothing to load now
            del self._pending[request_id]
            self.stats.add("transfers_loaded_failed")
            logger.warning("kvtransfer: request %s will recompute its prompt: transfer %s was not there to load", request_id, spec.transfer_id)
        if loaded:
            self.stats.add("transfers_loaded_sync")
        else:
            self._invalid_blocks.update(spec.block_ids)

    def take_invalid_blocks(self) -> set[int]:
        """Blocks that synchronous loads could not fill since the last call."""
        blocks, self._invalid_blocks = self._invalid_blocks, set()
        return blocks

    # A claimed transfer stays loadable for this many more polls (engine steps),
    # for parallel-sampling siblings admitted a step later; then it is released.
    RECLAIM_POLLS = 3

    def _release_claimed(self) -> None:
        for transfer_id in list(self._claimed):
            self._claimed[transfer_id] -= 1
            if self._claimed[transfer_id] <= 0:
                del self._claimed[transfer_id]
                if self.receiver is not None:
                    self.receiver.release(transfer_id)

    def _poll_loads(self) -> None:
        self._release_claimed()
        if not self._pending:
            return
        if self.receiver is None:
            for request_id in list(self._pending):
                self._fail(request_id, "this engine has no receiver (kv_role is not a consumer)")
            return
        now = time.monotonic()
        by_transfer: dict[str, list[_PendingLoad]] = {}
        for pending in self._pending.values():
            by_transfer.setdefault(pending.spec.transfer_id, []).append(pending)
        # Requests sharing a transfer (parallel sampling, n > 1) load from one claim;
        # a transfer may come in parts (one per prefill rank, see `_sources`).
        for transfer_id, loads in by_transfer.items():
            parts = [(part, self.receiver.claim(transfer_id + part.suffix)) for part in self._sources(loads[0].spec)]
            for part, claim in parts:
                if claim.state == "complete":
                    self._claimed[transfer_id + part.suffix] = self.RECLAIM_POLLS
            failed = next((claim for _, claim in parts if claim.state == "failed"), None)
            if failed is None and any(claim.state == "pending" for _, claim in parts):
                for pending in loads:
                    if now >= pending.deadline_s:
                        self.stats.add("load_timeouts")
                        self._fail(pending.spec.request_id, f"KV for transfer {transfer_id} did not arrive within {self.options.load_timeout_s}s")
                if not any(p.spec.request_id in self._pending for p in loads):
                    self._forget_parts(transfer_id, parts, "decode stopped waiting")
                continue
            if failed is not None:
                self._forget_parts(transfer_id, parts, "another part of this transfer failed")
            for pending in loads:
                request_id = pending.spec.request_id
                if failed is not None:
                    self._fail(request_id, f"transfer {transfer_id} failed: {failed.error}")
                    continue
                error = None
                for part, claim in parts:
                    assert claim.transfer is not None
                    error = self._write(pending.spec, part, claim.transfer)
                    if error:
                        break
                if error:
                    self._fail(request_id, error)
                else:
                    del self._pending[request_id]
                    self._finished.add(request_id)
                    self.stats.add("transfers_loaded_ok")

    def _forget_parts(self, transfer_id: str, parts, reason: str) -> None:
        assert self.receiver is not None
        for part, claim in parts:
            if claim.state == "pending":
                self.receiver.forget(transfer_id + part.suffix, reason)

    def _write(self, spec: LoadSpec, part: _Part, transfer: Transfer) -> str | None:
        begin = transfer.begin
        if begin.prompt_hash != spec.prompt_hash or begin.num_tokens != spec.num_tokens:
            return f"transfer {spec.transfer_id} carries another prompt ({begin.num_tokens} tokens, hash {begin.prompt_hash})"
        if (begin.first_layer, begin.num_layers) != (part.first_layer, part.num_layers):
            return (
                f"part {spec.transfer_id}{part.suffix} holds layers {begin.first_layer}+{begin.num_layers}; "
                f"expected {part.first_layer}+{part.num_layers} (prefill's pipeline split is not the one its handoff named)"
            )
        layout = self.layout
        assert layout is not None
        start, stop = spec.first_block, spec.first_block + len(spec.block_ids)
        try:
            for chunk in transfer.chunks:
                h = chunk.header
                lo, hi = max(h.first_block, start), min(h.first_block + h.num_blocks, stop)
                if lo >= hi:
                    continue  # these blocks were a local prefix-cache hit
                blocks = codec.decode(chunk.payload, h.encoding, h.dtype, h.shape)
                layout.scatter(
                    layout.local[h.layer], spec.block_ids[lo - start : hi - start],
                    blocks[lo - h.first_block : hi - h.first_block], part.heads,
                )
        except (RuntimeError, ValueError) as exc:
            return f"transfer {spec.transfer_id} could not be written into the cache: {exc}"
        return None

    def _fail(self, request_id: str, error: str) -> None:
        logger.warning("kvtransfer: request %s will recompute its prompt: %s", request_id, error)
        self._pending.pop(request_id, None)
        self._failed.add(request_id)
        self._finished.add(request_id)
        self.stats.add("transfers_loaded_failed")

    def take_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(finished_recving, failed_recving) since the last call."""
        self._poll_loads()
        for request_id in finished_req_ids & set(self._pending):
            # Aborted while waiting for its KV: vLLM frees its blocks once we report it.
            spec = self._pending.pop(request_id).spec
            if self.receiver is not None:
                for part in self._sources(spec):  # every part's bytes go now, not at lease expiry
                    self.receiver.forget(spec.transfer_id + part.suffix, "request aborted")
            self._finished.add(request_id)
        finished, failed = self._finished, self._failed
        self._finished, self._failed = set(), set()
        self.stats.flush()
        return finished, failed
