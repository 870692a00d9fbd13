"""Prefix-cache block hashes, computed the way vLLM computes them.

vLLM's prefix cache keys each full block of `block_size` prompt tokens by a
chained hash (vllm/v1/core/kv_cache_utils.py, `hash_block_tokens`):

    hash(block i) = H((hash(block i-1), tuple(token ids of block i), extra_keys))
    hash(block -1) = NONE_HASH = H(seed)

with H = `prefix_caching_hash_algo` (default "sha256": SHA-256 of the pickled
object, vllm/utils/hashing.py) and seed = $PYTHONHASHSEED if set, else
"vllm-none-hash" for the cryptographic algorithms (`resolve_none_hash_seed`).
Its KV-cache events (`BlockStored`, `BlockRemoved`) name blocks by these same
hashes (by default as the low 64 bits of the big-endian digest,
VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1; as the digest bytes otherwise), so
the router can look a new request's blocks up in what the engines reported,
exactly: both forms become the same `BlockKey` (`block_key`). A test compares these hashes with the ones a real engine
publishes for the same tokens (tests/router/test_router_prefix_events.py) and
with vLLM's own function.

Why not call vLLM's function: importing vLLM costs the router process 4-8 s
and hundreds of MB for three lines of hashing; the router stays free of it.
Requests with extra keys (LoRA, multimodal inputs, cache_salt) hash
differently; the router sends none of them, so extra_keys is always None.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from functools import lru_cache

BlockKey = int  # a block hash as the index keys it: the low 64 bits of vLLM's digest
_KEY_MASK = (1 << 64) - 1
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"  # vLLM's seed when PYTHONHASHSEED is unset
SUPPORTED_ALGOS = ("sha256",)


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


@lru_cache(maxsize=4)
def none_hash(seed: str) -> bytes:
    """The parent hash of a prompt's first block."""
    return _sha256_pickle(seed)


def block_key(block_hash: bytes | int) -> BlockKey:
    """One key for a block, whichever form its event used (vLLM's maybe_convert_block_hash)."""
    if isinstance(block_hash, int):
        return block_hash & _KEY_MASK
    return int.from_bytes(block_hash, "big") & _KEY_MASK


def none_hash_seed() -> str:
    """The seed vLLM derives NONE_HASH from in a process with this environment."""
    return os.environ.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)


def block_keys(token_ids: Sequence[int], block_size: int, seed: str | None = None) -> list[BlockKey]:
    """The index keys of the full blocks of `token_ids`."""
    return [block_key(h) for h in block_hashes(token_ids, block_size, seed)]


def block_hashes(token_ids: Sequence[int], block_size: int, seed: str | None = None) -> list[bytes]:
    """vLLM's hashes of the full blocks of `token_ids` (a trailing partial block has none)."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    parent = none_hash(seed if seed is not None else none_hash_seed())
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _sha256_pickle((parent, tuple(token_ids[start:start + block_size]), None))
        hashes.append(parent)
    return hashes
