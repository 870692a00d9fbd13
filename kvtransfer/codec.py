"""Tensor <-> payload bytes: raw (zero-copy view) or int8 per-channel quantised.

raw: the payload is the tensor's own memory, viewed as bytes; nothing is copied.
int8: for a chunk shaped (num_blocks, *block_shape), every channel (an index
into the block's non-token axes) gets one float32 scale = max|x| / 127 over
all blocks and tokens of the chunk; the payload is the int8 values followed by
the scales. It halves (fp16) or quarters (fp32) the bytes on slow links at an
accuracy cost measured by benchmarks/kvtransfer_e2e.py.
"""

from __future__ import annotations

import warnings

import torch

from common.wire import ProtocolError
from kvtransfer.protocol import int8_scale_count, token_axis

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"KV dtype {dtype} is not supported; use one of {sorted(TORCH_DTYPES)}") from None


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as a flat byte view (no copy; tensor must be contiguous)."""
    assert tensor.is_contiguous()
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B") if tensor.numel() else memoryview(b"")


def from_bytes(payload: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only tensor over the payload's memory (no copy)."""
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable; we only read from it.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(payload, dtype=torch.uint8)
    return flat.view(TORCH_DTYPES[dtype]).view(shape)


def _reduce_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    return (0, 1 + token_axis(shape[1:]))


def encode(tensor: torch.Tensor, encoding: str) -> tuple[torch.Tensor, ...]:
    """Tensors whose bytes, concatenated, form the payload (one for raw, two for int8)."""
    if encoding == "raw":
        return (tensor.contiguous(),)
    x = tensor.float()
    dims = _reduce_dims(tuple(tensor.shape))
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8).contiguous()
    return (q, scale.contiguous().view(-1))


def decode(payload: bytes | memoryview, encoding: str, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The chunk as a tensor of `dtype` and `shape` (a view for raw, a new tensor for int8)."""
    if encoding == "raw":
        return from_bytes(payload, dtype, shape)
    numel = 1
    for d in shape:
        numel *= d
    num_scales = int8_scale_count(shape)
    if len(payload) != numel + 4 * num_scales:
        raise ProtocolError(f"int8 payload is {len(payload)} bytes; expected {numel + 4 * num_scales}")
    q = from_bytes(memoryview(payload)[:numel], "int8", shape)
    scale_shape = list(shape)
    for d in _reduce_dims(shape):
        scale_shape[d] = 1
    scale = from_bytes(memoryview(payload)[numel:], "float32", tuple(scale_shape))
    return (q.float() * scale).to(TORCH_DTYPES[dtype])
