"""How one worker's paged KV cache is laid out, and the two copies in and out of it.

vLLM hands the connector one tensor per attention layer. Where the block
axis sits depends on the attention backend (CPU: [num_blocks, kv_heads,
block_size, 2 * head_size]; flash-attn: [2, num_blocks, block_size, kv_heads,
head_size]); `CacheLayout` finds it, and the KV-head axis when it can be told
apart, so the send path can gather a request's blocks (one copy: paged
blocks are not contiguous) and the load path can scatter received ones into
the request's blocks (the one copy on decode), whole or into a slice of the
heads.
"""

from __future__ import annotations

import torch

from kvtransfer import codec


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

    @property
    def num_heads(self) -> int | None:
        """KV heads in this cache, where the head axis is known (see reshard.RankShape)."""
        return None if self.head_axis is None else self.block_shape[self.head_axis]

    @staticmethod
    def block_index(block_ids: list[int], device: torch.device) -> torch.Tensor:
        """block_ids as the index tensor gather takes (build it once per step, not per layer)."""
        return torch.tensor(block_ids, dtype=torch.long, device=device)

    def gather(self, layer: torch.Tensor, block_ids: list[int] | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks block_ids of one layer as one contiguous CPU tensor (n, *block_shape): into `out`
        when given (one copy: a CPU cache's blocks go straight into a message's buffer)."""
        idx = block_ids if isinstance(block_ids, torch.Tensor) else self.block_index(block_ids, layer.device)
        if out is not None and self.block_dim == 0 and layer.device == out.device:
            return torch.index_select(layer, 0, idx, out=out)
        gathered = layer.index_select(self.block_dim, idx)
        if self.block_dim:
            gathered = gathered.movedim(self.block_dim, 0)
        if out is not None:
            return out.copy_(gathered)
        return gathered.contiguous().cpu()

    def heads_view(self, blocks: torch.Tensor, heads: slice) -> torch.Tensor:
        """A slice of the KV heads of gathered blocks (n, *block_shape), as a view (strided)."""
        assert self.head_axis is not None
        axis = self.head_axis + 1  # blocks is (num_blocks, *block_shape)
        return blocks.narrow(axis, heads.start, heads.stop - heads.start)

    def heads_of(self, blocks: torch.Tensor, heads: slice) -> torch.Tensor:
        """A slice of the KV heads of gathered blocks, contiguous (one copy)."""
        return self.heads_view(blocks, heads).contiguous()

    def scatter(
        self, layer_index: int, block_ids: list[int] | torch.Tensor, blocks: torch.Tensor, heads: slice | None = None
    ) -> None:
        """Write blocks (n, *block_shape) into block_ids; with `heads`, into that slice of the KV heads only."""
        layer = self.tensors[layer_index]
        if heads is not None:
            assert self.head_axis is not None
            axis = self.head_axis + (1 if self.head_axis >= self.block_dim else 0)  # the block axis sits before it
            layer = layer.narrow(axis, heads.start, heads.stop - heads.start)
        idx = block_ids if isinstance(block_ids, torch.Tensor) else self.block_index(block_ids, layer.device)
        src = blocks.to(layer.device)
        if self.block_dim:
            src = src.movedim(0, self.block_dim)
        layer.index_copy_(self.block_dim, idx, src)


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
